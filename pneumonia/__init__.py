"""Pneumonia screening on PneumoniaMNIST: the library behind the DVC stages in stages/.

Importing it makes TensorFlow load quietly (see _QuietTensorFlow); PNEUMONIA_TF_LOGS=1 turns that off.
"""
import contextlib
import importlib.abc
import importlib.util
import os
import sys
import tempfile
import warnings

# Still set for TensorFlow's Python side; its C++ side ignores it since TensorFlow moved to absl logging.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Loads TensorFlow, whoever imports it (Keras, a stage), with file descriptor 2 sent to a temporary file.

    TensorFlow's C++ side writes its start-up chatter (absl's InitializeLog notice, oneDNN, cudart_stub, and
    cuInit when devices are listed on a machine without a GPU) straight to fd 2, which no Python setting stops.
    What it wrote is dropped when the import succeeds and shown when it fails, before the import's own error;
    Python warnings raised meanwhile are shown as usual.
    """

    def __init__(self):
        self._finding = False

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(name)  # the other finders, in their order
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            load = spec.loader.exec_module

            def exec_module(module):
                caught = []
                with tempfile.TemporaryFile() as log:
                    try:
                        with warnings.catch_warnings(record=True) as caught, _fd2_to(log):
                            load(module)
                            module.config.list_physical_devices()  # device discovery logs too (cuInit)
                    except BaseException:
                        log.seek(0)
                        sys.stderr.write(log.read().decode(errors="replace"))
                        raise
                    finally:
                        for w in caught:
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

            spec.loader.exec_module = exec_module  # this module's own loader instance only
        return spec


@contextlib.contextmanager
def _fd2_to(file):
    """File descriptor 2, where C and C++ code write, points at `file` inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_float16_notice() -> None:
    """Run one float16 op now, keeping TensorFlow's once-per-process oneDNN notice about it off the output.

    On CPUs without AVX-512 FP16, TensorFlow prints "oneDNN supports DT_HALF only on platforms with AVX-512 ..."
    (and falls back to Eigen) when the first float16 op runs: under mixed precision, or on the float16
    activation cache. That happens after import, outside _QuietTensorFlow; this runs that first op while fd 2
    is captured, and passes on anything else it printed. Call it after the devices are configured.
    """
    if not _QUIET:
        return
    import tensorflow as tf

    with tempfile.TemporaryFile() as log:
        with _fd2_to(log), tf.device("/CPU:0"):
            ones = tf.ones((2, 2), tf.float16)
            tf.matmul(ones, ones).numpy()
        log.seek(0)
        for line in log.read().decode(errors="replace").splitlines(keepends=True):
            if "supports DT_HALF only on platforms with AVX-512" not in line:
                sys.stderr.write(line)


_QUIET = os.environ.get("PNEUMONIA_TF_LOGS", "") in ("", "0")
if _QUIET and "tensorflow" not in sys.modules:
    sys.meta_path.insert(0, _QuietTensorFlow())
