"""The stage scripts, one per dvc.yaml stage: python -m stages.<name>.

Importing the package first checks that this interpreter has the project's packages: DVC runs each stage's
`python` from PATH, which without the venv on it is the system Python, and a stage would die on its first
import with a traceback that does not say why.
"""
import importlib.util
import sys

# Top-level import names of what the stages use (requirements.txt and medmnist); find_spec does not import them.
_RUNTIME = ("keras", "dvclive", "medmnist", "sklearn", "pandas", "yaml", "PIL", "matplotlib")

_missing = [name for name in _RUNTIME if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(  # printed to stderr as one line, exit status 1
        f"error: {sys.executable} lacks {', '.join(_missing)}, which the stages need (DVC runs them with the python "
        "first on PATH); use the project's venv: source .venv/bin/activate, or make run, or PATH=$PWD/.venv/bin:$PATH dvc ...")
