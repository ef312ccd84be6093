"""A synthetic PneumoniaMNIST-layout file: real split sizes, a learnable signal, generated in a second."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SIZES = {"train": 4708, "val": 524, "test": 624}
# The tests' DVC projects run on this smaller file (tests/small_splits/sitecustomize.py makes the split check expect it).
PIPELINE_SIZES = {"train": 320, "val": 96, "test": 96}
POSITIVE_RATE = 0.74  # about PneumoniaMNIST's share of pneumonia


def make_arrays(seed: int = 0, size: int = 28, sizes: dict = SIZES) -> dict[str, np.ndarray]:
    """Images of size x size pixels (data.size: 28, or MedMNIST+'s 64, 128, 224); the same layout at every size."""
    rng = np.random.default_rng(seed)
    arrays = {}
    yy, xx = np.mgrid[:size, :size] * (28 / size)  # in 28-pixel units, so the patch scales with the image
    for split, n in sizes.items():
        labels = (rng.random(n) < POSITIVE_RATE).astype(np.uint8)
        images = rng.normal(90, 25, size=(n, size, size))
        # "pneumonia": a bright blurry patch somewhere in the middle of the image
        cy, cx = rng.integers(9, 19, size=(2, n))
        blob = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 18.0)
        images += labels[:, None, None] * 110 * blob
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    return arrays


def write(path: str | Path, seed: int = 0, size: int = 28, sizes: dict = SIZES, **overrides) -> Path:
    arrays = make_arrays(seed, size, sizes) | overrides
    np.savez(path, **arrays)
    return Path(path)


def small_splits_env(env: dict | None = None, sizes: dict = PIPELINE_SIZES) -> dict:
    """The environment for a subprocess that runs the pipeline on a file of these split sizes."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).with_name("small_splits")),
                                                      env.get("PYTHONPATH", "")]))
    env["PNEUMONIA_TEST_SPLIT_SIZES"] = ",".join(f"{k}={v}" for k, v in sizes.items())
    return env
