"""Stage 2: data.size -> image_size pixels square, kept as uint8 with one channel (data/resized/).

When image_size equals data.size (a native-resolution file) the images are kept as they are.
"""

import numpy as np

from pneumonia import data, files, stage
from pneumonia.files import RAW_NPZ, RESIZED_DIR


def main(params):
    source_size, size = params.data.size, params.image_size
    arrays = data.load_npz(RAW_NPZ, data.dataset_info(source_size))
    how = "kept, already at image_size" if size == source_size else params.resize.interpolation
    for split in data.SPLITS:
        images = arrays[f"{split}_images"]
        if size != source_size:
            images = data.resize_images(images, size, params.resize.interpolation)
        with files.atomic_path(RESIZED_DIR / f"{split}.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=arrays[f"{split}_labels"].reshape(-1))
        print(f"  {split}: {len(images)} images {source_size}x{source_size} -> {size}x{size} ({how})", flush=True)
    files.write_json(RESIZED_DIR / "record.json", {"resize": params.listed()})  # what the model card states


if __name__ == "__main__":
    stage.run("resize", main)
