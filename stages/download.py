"""Stage 1: get PneumoniaMNIST at data.size px (download with MD5 check, or a local .npz) into data/raw/.

It runs on every `dvc repro` (always_changed: a local file can change at the same path) and rewrites
data/raw only when the source's content differs from what is there, so later stages skip otherwise.
"""
import json

from pneumonia import data, files, stage
from pneumonia.files import PROVENANCE, RAW_NPZ


def _previous() -> dict | None:
    try:
        return json.loads(PROVENANCE.read_text())
    except (OSError, ValueError):
        return None


def main(params):
    source, size = params.data.source, params.data.size
    previous = _previous()
    if data.is_current(source, RAW_NPZ, previous, size):
        print(f"download: {source} ({size} px) unchanged (MD5 {previous['md5']}); data/raw kept", flush=True)
        return
    info = data.dataset_info(size)
    print(f"download: source {source}, {size}x{size} px", flush=True)
    provenance = data.fetch(source, RAW_NPZ, info)
    if "warning" in provenance:
        print(f"warning: {source}: {provenance['warning']} (expected for a re-ordered copy; the content was validated)")
    files.write_json(PROVENANCE, provenance)
    for split, counts in provenance["class_counts"].items():
        print(f"  {split}: {counts}")


if __name__ == "__main__":
    stage.run("download", main)
