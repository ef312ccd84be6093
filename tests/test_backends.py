"""Training beyond the default single-device TensorFlow run: MirroredStrategy, and the JAX backend.

Each case runs tests/tiny_training.py in a fresh process (both phases, 64 images, 32 px, 1 epoch).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("tiny_training.py")


def _train(tmp_path, *args, backend="tensorflow") -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check_trained(result: dict) -> None:
    assert all(np.isfinite(loss) for loss in result["loss"].values()), result
    assert result["moved"]["logit"] > 0 and result["moved"]["conv5_block3_3_conv"] > 0  # both phases changed weights
    assert result["logits_shape"] == [64, 1] and result["logits_finite"]
    assert result["probabilities_shape"] == [64, 1]


def test_mirrored_strategy_trains_both_phases_on_two_devices(tmp_path):
    result = _train(tmp_path, "--cpus", "2", "--distribute", "mirrored")
    assert result["backend"] == "tensorflow" and result["replicas"] == 2
    _check_trained(result)


def test_jax_backend_trains_both_phases_without_tensorflow(tmp_path):
    pytest.importorskip("jax", reason="jax cannot be imported; pip install -r requirements-dev.txt")
    result = _train(tmp_path, "--without-tensorflow", backend="jax")
    assert result["backend"] == "jax" and result["replicas"] == 1
    _check_trained(result)
    assert not result["tensorflow_imported"]
