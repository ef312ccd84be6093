"""What the library prints: TensorFlow loads without its C++ start-up chatter (real warnings and errors still
show), and long loops report progress, as a bar on a terminal and a line per tenth elsewhere."""
import io
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from pneumonia.progress import progress

CHATTER = ("absl::InitializeLog", "oneDNN custom operations", "cudart_stub", "cuInit")

# Stands in for TensorFlow: writes to fd 2 as its C++ side does, warns from Python, and can fail to load.
FAKE_TENSORFLOW = '''
import os
import warnings

os.write(2, b"I0000 00:00:1.2 7 port.cc:153] oneDNN custom operations are on.\\n")
warnings.warn("a real warning while loading")
if os.environ.get("FAKE_TF_FAIL"):
    os.write(2, b"libtensorflow_framework.so.2: cannot open shared object file\\n")
    raise ImportError("fake TensorFlow failed to load")


class config:
    @staticmethod
    def list_physical_devices():
        os.write(2, b"E0000 00:00:1.3 7 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)\\n")
        return []
'''


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (tmp_path, ROOT))), **env})


@pytest.fixture
def fake_tf(tmp_path):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow/__init__.py").write_text(FAKE_TENSORFLOW)
    return tmp_path


def test_chatter_is_dropped_and_python_warnings_kept(fake_tf):
    proc = _python("import pneumonia, tensorflow; print(tensorflow.__name__)", fake_tf)
    assert proc.returncode == 0 and proc.stdout == "tensorflow\n"
    assert "UserWarning: a real warning while loading" in proc.stderr
    assert not [c for c in CHATTER if c in proc.stderr], proc.stderr


def test_the_switch_and_a_plain_import_show_the_chatter(fake_tf):
    """Controls: the fake chatters unless pneumonia quiets it; PNEUMONIA_TF_LOGS=1 turns the quieting off."""
    assert "oneDNN custom operations" in _python("import tensorflow", fake_tf).stderr
    loud = _python("import pneumonia, tensorflow; tensorflow.config.list_physical_devices()", fake_tf,
                   PNEUMONIA_TF_LOGS="1")
    assert loud.returncode == 0 and "oneDNN custom operations" in loud.stderr and "cuInit" in loud.stderr


def test_a_failed_import_shows_what_it_wrote_and_its_error(fake_tf):
    proc = _python("import pneumonia, tensorflow", fake_tf, FAKE_TF_FAIL="1")
    assert proc.returncode == 1
    assert "libtensorflow_framework.so.2: cannot open shared object file" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ImportError: fake TensorFlow failed to load"


def test_the_real_tensorflow_chatters_with_the_switch(tmp_path):
    """The control for the real TensorFlow's silence, which is checked where it matters: every stage's stderr
    (tests/test_pipeline.py) and the training runs of tests/test_backends.py hold progress lines only."""
    code = "import pneumonia, keras; print(keras.backend.backend())"
    loud = _python(code, tmp_path, KERAS_BACKEND="tensorflow", PNEUMONIA_TF_LOGS="1")
    assert loud.returncode == 0 and loud.stdout == "tensorflow\n" and "absl::InitializeLog" in loud.stderr


@pytest.mark.parametrize("total", [7, 64, 2000])
def test_progress_off_a_terminal_is_a_line_per_tenth(total, capsys):
    with progress(total, "bootstrap", "resamples") as report:
        for done in range(1, total + 1):
            report(done)
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout may carry data (predict's CSV)
    lines = captured.err.splitlines()
    done = [int(re.fullmatch(rf"  bootstrap: (\d+)/{total} resamples", line)[1]) for line in lines]
    assert len(lines) == min(total, 10) and done[-1] == total and done == sorted(set(done))
    assert [d * 10 // total for d in done] == sorted(set(d * 10 // total for d in done))  # one line per tenth reached


def test_progress_on_a_terminal_is_a_tqdm_bar(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    with progress(64, "Grad-CAM") as report:
        for done in (32, 64):
            report(done)
    shown = sys.stderr.getvalue()
    assert "\r" in shown and re.search(r"Grad-CAM: 100%\|[^|]*\| 64/64 ", shown), shown  # redrawn in place
    assert "  Grad-CAM: 64/64 images" not in shown
