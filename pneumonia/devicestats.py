"""Opt-in measurements for `make gpu-check`: training throughput per phase and the accelerator's peak memory.

Off unless PNEUMONIA_DEVICE_STATS names a file; then each training phase (pneumonia.train.Throughput) and each
stage append one JSON line to it. Nothing here changes what a stage computes or writes to its outputs, and
nothing here imports Keras (the download stage never needs it).
"""
from __future__ import annotations

import json
import os
import sys

ENV = "PNEUMONIA_DEVICE_STATS"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def append(entry: dict) -> None:
    with open(os.environ[ENV], "a") as f:
        f.write(json.dumps(entry) + "\n")


def peak_memory_bytes() -> int | None:
    """The accelerator allocator's peak bytes in use (JAX preallocates most of the card, so nvidia-smi's figure
    says nothing); None without an accelerator or before the backend has started."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "jax" and "jax" in sys.modules:
        import jax

        peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices() if d.platform == "gpu"]
        peaks = [p for p in peaks if p is not None]
        return max(peaks) if peaks else None
    if backend == "tensorflow" and "tensorflow" in sys.modules:
        import tensorflow as tf

        if not tf.config.list_logical_devices("GPU"):
            return None
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])
    return None
