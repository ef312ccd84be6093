"""Stage 1: get PneumoniaMNIST (download with MD5 check, or a local .npz) into data/raw/."""
from pathlib import Path

from pneumonia import data, files, stage

RAW_DIR = Path("data/raw")


def main(params):
    info = data.dataset_info()
    print(f"download: source {params.data.source}", flush=True)
    provenance = data.fetch(params.data.source, RAW_DIR / "pneumoniamnist.npz", info)
    if "warning" in provenance:
        print(f"warning: {params.data.source}: {provenance['warning']} (expected for a re-ordered copy; the content was validated)")
    files.write_json(RAW_DIR / "provenance.json", provenance)
    for split, counts in provenance["class_counts"].items():
        print(f"  {split}: {counts}")


if __name__ == "__main__":
    stage.run("download", main)
