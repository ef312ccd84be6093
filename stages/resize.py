"""Stage 2: 28x28 -> image_size x image_size, kept as uint8 with one channel (data/resized/)."""
from pathlib import Path

import numpy as np

from pneumonia import data, files, stage

RAW_NPZ = Path("data/raw/pneumoniamnist.npz")
RESIZED_DIR = Path("data/resized")


def main(params):
    arrays = data.load_npz(RAW_NPZ, data.dataset_info())
    for split in data.SPLITS:
        images = data.resize_images(arrays[f"{split}_images"], params.image_size, params.resize.interpolation)
        with files.atomic_path(RESIZED_DIR / f"{split}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=arrays[f"{split}_labels"].reshape(-1))
        print(f"  {split}: {len(images)} images -> {params.image_size}x{params.image_size} ({params.resize.interpolation})", flush=True)
    files.write_json(RESIZED_DIR / "record.json", {"resize": params.listed()})  # what the model card states


if __name__ == "__main__":
    stage.run("resize", main)
