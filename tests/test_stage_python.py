"""A stage run by a python without the project's packages stops in one line that says which python and the fix."""
import os
import subprocess
import sys

from conftest import ROOT


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def test_a_stage_under_a_python_without_the_packages_is_one_line_and_exit_1(tmp_path):
    # A bare venv (no pip, no site-packages): what DVC gets from PATH when the project's venv is not on it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    bare = tmp_path / "bare" / "bin" / "python"
    proc = subprocess.run([str(bare), "-m", "stages.download"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.splitlines() == [
        f"error: {bare} lacks keras, dvclive, medmnist, sklearn, pandas, yaml, PIL, matplotlib, which the stages need "
        "(DVC runs them with the python first on PATH); use the project's venv: source .venv/bin/activate, or make "
        "run, or PATH=$PWD/.venv/bin:$PATH dvc ..."]


def test_the_projects_python_passes_the_check():
    proc = subprocess.run([sys.executable, "-c", "import stages"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
