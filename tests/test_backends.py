"""The GPU defaults, exercised on CPU: mixed precision, XLA, MirroredStrategy over two logical CPU devices, and
JAX with jit, each through training paths of tests/tiny_training.py (phase 1 cached, phase 2 cached from
conv5_block1 on a float16 cache, the whole network with on-the-fly augmentation). Phase 1 is the cached path
with a Dense suffix and a float32 cache: it runs where the defaults a GPU user gets run it (mixed precision and
XLA), and in every tiny pipeline; the other runtimes take the cached phase 2, the same code on a harder suffix. The
MirroredStrategy runtime trains with MixUp, whose batches carry sample weights and mix the float16 cache.

Each runtime trains in a fresh process for 2 epochs, keeping the checkpoint written after epoch 1; a second
fresh process resumes from it, as `dvc repro` does after a kill. Checked for every path: it trained, the
saved model is float32 with float32 logits, XLA was really compiled where it was asked for, and the resumed
run ends with the uninterrupted run's weights. They are bit-identical on these CPUs, XLA included (XLA
compiles the same program in both processes), so the comparison is exact.

TensorFlow's XLA is not run on the whole network: compiling ResNet-50's whole train step takes minutes on 2
cores. JAX's jit covers the whole network with augmentation, compiled. MirroredStrategy runs the cached phase 2
(what is made under the strategy, full batches, resume in its scope); the whole network with augmentation
under TensorFlow trains in tests/test_augment.py (and resumes exactly there). Phase 1 under JAX or MirroredStrategy is
not run here: it is the cached path's fit, which both run, on a Dense suffix.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PROGRESS

SCRIPT = Path(__file__).with_name("tiny_training.py")
# absl's C++ log line: severity and date (I, W or E, then MMDD; 0000 and raw seconds before absl is set up), time,
# thread id, file:line], message.
TF_CPP_LOG = re.compile(r"[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [\w.]+:\d+\] ")
ALL_PATHS = ("head", "cached", "whole")

RUNTIMES = {
    "tensorflow-mixed-precision-xla": (("--mixed-precision", "on", "--jit-compile", "on", "--paths", "head,cached"),
                                       "tensorflow", True),
    # With MixUp: its batches carry sample weights (through the strategy's distributed input) and mix the float16
    # cache under mixed precision.
    "tensorflow-mirrored-mixed-precision-mixup": (("--cpus", "2", "--distribute", "mirrored", "--mixed-precision", "on",
                                                   "--paths", "cached", "--mixup", "0.2"), "tensorflow", False),
    "jax-jit": (("--without-tensorflow", "--paths", "cached,whole"), "jax", True),
}


def _train(folder: Path, *args, backend: str) -> dict:
    folder.mkdir(exist_ok=True)
    env = dict(os.environ, KERAS_BACKEND=backend)
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["weights"] = dict(np.load(folder / "weights.npz"))
    result["stderr"] = proc.stderr
    return result


@pytest.mark.parametrize("name", RUNTIMES)
def test_each_path_trains_saves_float32_and_resumes_exactly(tmp_path, name):
    if name.startswith("jax"):
        pytest.importorskip("jax", reason="jax cannot be imported; pip install -r requirements-dev.txt")
    args, backend, jit = RUNTIMES[name]
    paths = args[args.index("--paths") + 1].split(",") if "--paths" in args else list(ALL_PATHS)
    first = _train(tmp_path / "uninterrupted", *args, "--snapshot", str(tmp_path / "epoch-1"), backend=backend)
    resumed = _train(tmp_path / "resumed", *args, "--resume", str(tmp_path / "epoch-1"), backend=backend)

    assert first["backend"] == backend and not (backend == "jax" and first["tensorflow_imported"])
    # Nothing on stderr but progress lines. Some CPUs (without AVX-512 FP16) make TensorFlow
    # print a oneDNN DT_HALF notice at the first float16 op, long after import: under mixed precision or on the
    # float16 cache. configure() runs that first op with the notice kept off the output.
    # Under MirroredStrategy, TensorFlow 2.21's distributed input pipeline logs C++ lines there (auto_shard,
    # GeneratorDatasetOp, use_unbounded_threadpool), a different set from run to run, that no setting stops: those
    # are allowed, in absl's C++ log format only, so a Python warning or traceback still fails.
    for run in (first, resumed):
        others = [line for line in run["stderr"].splitlines() if not PROGRESS.match(line)]
        if "mirrored" in name:
            others = [line for line in others if not TF_CPP_LOG.match(line)]
        assert not others, run["stderr"][-3000:]
    assert first["replicas"] == (2 if "mirrored" in name else 1)
    for path in paths:
        result = first[path]
        assert np.isfinite(result["loss"]) and result["logit_moved"], (path, result)
        if path != "head":
            assert result["conv5_moved"] > 0, (path, result)
        assert result["saved_logits_dtype"] == "float32" and result["saved_policies"] == ["float32"], (path, result)
    # What was compiled, as each path's training line states it (Keras drops XLA silently for a layer without it).
    assert first["stdout"].count("XLA on" if jit else "XLA off") == len(paths), first["stdout"]
    if "--mixup" in args:
        assert first["stdout"].count("batches mixed by MixUp (alpha 0.2)") == len(paths), first["stdout"]
    assert resumed["stdout"].count("resuming an interrupted run after epoch 1") == len(paths), resumed["stdout"]
    assert "discarding" not in resumed["stdout"]
    assert first["weights"].keys() == resumed["weights"].keys()
    for key, value in first["weights"].items():
        np.testing.assert_array_equal(resumed["weights"][key], value, err_msg=key)
