"""Test-only, on PYTHONPATH of the tests' subprocesses: medmnist.INFO reports the split sizes named in
PNEUMONIA_TEST_SPLIT_SIZES (e.g. "train=320,val=96,test=96").

The pipeline refuses a file whose splits are not PneumoniaMNIST's (4708/524/624, from medmnist.INFO). The
tests' DVC projects run the real pipeline, every stage through the real dvc CLI, on a smaller synthetic file
(tests/synthetic.py PIPELINE_SIZES), so the check must expect that file's sizes there. Nothing else changes.
"""
import importlib.abc
import importlib.util
import os
import sys

_SIZES = os.environ.get("PNEUMONIA_TEST_SPLIT_SIZES")


class _SmallSplits(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "medmnist.info":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module
        sizes = {split: int(n) for split, n in (part.split("=") for part in _SIZES.split(","))}

        def exec_module(module):
            load(module)
            module.INFO["pneumoniamnist"]["n_samples"] = sizes

        spec.loader.exec_module = exec_module
        return spec


if _SIZES:
    sys.meta_path.insert(0, _SmallSplits())
