import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import synthetic

ROOT = Path(__file__).resolve().parents[1]
# pneumonia.progress's lines off a terminal: what a stage or training run may write to stderr.
PROGRESS = re.compile(r"^  ([\w+ -]+): (\d+)/(\d+) (\w+)$")
# Project files a user clone has; everything else (venv, outputs, caches) stays behind.
SKIP = {".venv", ".git", "data", "models", "dvclive", "metrics", "plots", "reports", ".pytest_cache", "__pycache__",
        "tmp", "cache", "work", "node_modules"}

TINY = {
    "image_size": 32,
    "model": {"weights": "none", "dropout": 0.2},
    "train_head": {"epochs": 1},
    # conv5_block1, not auto (conv1 without weights): an epoch of the whole network is four times slower.
    # 2 epochs: the trained project is also the uninterrupted run a killed and resumed one must equal.
    "fine_tune": {"epochs": 2, "lr": 1e-4, "unfreeze_from": "conv5_block1"},
    "evaluate": {"bootstrap": {"samples": 50}},
    "error_analysis": {"cases": 4},
}


@pytest.fixture(scope="session")
def synthetic_npz(tmp_path_factory) -> Path:
    return synthetic.write(tmp_path_factory.mktemp("data") / "synthetic.npz")


@pytest.fixture(scope="session")
def pipeline_npz(tmp_path_factory) -> Path:
    """The smaller synthetic file the DVC projects run on (their subprocesses expect its split sizes)."""
    return synthetic.write(tmp_path_factory.mktemp("data") / "pipeline.npz", sizes=synthetic.PIPELINE_SIZES)


def tool_env(tmp: Path) -> dict:
    env = synthetic.small_splits_env()
    env.update(
        PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(tmp / "dvc-site-cache"),
        XDG_CACHE_HOME=str(tmp / "xdg-cache"),
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    return env


class Repo:
    """A temporary git + DVC copy of the project, driven through the real CLIs."""

    def __init__(self, path: Path):
        self.path = path
        self.env = tool_env(path.parent)

    def run(self, *args, check=True, timeout=900) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def dvc(self, *args, **kw):
        return self.run(sys.executable, "-m", "dvc", *args, **kw)

    def git(self, *args, **kw):
        return self.run("git", *args, **kw)

    def set_params(self, updates: dict) -> None:
        path = self.path / "params.yaml"
        params = yaml.safe_load(path.read_text())

        def merge(dst, src):
            for k, v in src.items():
                if isinstance(v, dict):
                    merge(dst.setdefault(k, {}), v)
                else:
                    dst[k] = v

        merge(params, updates)
        path.write_text(yaml.safe_dump(params, sort_keys=False))


def load_script(path: Path):
    """A script that is not a package module (bench/*.py), imported for its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_repo(tmp: Path, source: Path, extra: dict | None = None) -> Repo:
    path = tmp / "project"
    keep = (ROOT / ".dvc", ROOT / ".dvc" / "plots")  # .dvc/plots holds plot templates, not outputs
    shutil.copytree(ROOT, path, ignore=lambda d, names: [n for n in names if n in SKIP and Path(d, n) not in keep])
    repo = Repo(path)
    repo.git("init", "-q", "-b", "main")
    repo.set_params(TINY | {"data": {"source": str(source)}} | (extra or {}))
    repo.git("add", "-A")
    repo.git("commit", "-qm", "tiny pipeline")
    return repo


@pytest.fixture
def repo(tmp_path, pipeline_npz) -> Repo:
    return make_repo(tmp_path, pipeline_npz)


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory, pipeline_npz) -> Repo:
    """One tiny `dvc repro`, committed with its dvc.lock, for every test that needs a trained project."""
    repo = make_repo(tmp_path_factory.mktemp("trained"), pipeline_npz)
    proc = repo.dvc("repro")
    repo.repro_output, repo.repro_errors = proc.stdout, proc.stderr
    repo.git("add", "-A")
    repo.git("commit", "-qm", "baseline run")
    return repo


@pytest.fixture
def trained_repo(tmp_path, trained_template) -> Repo:
    """A private copy of the trained project (git history, DVC cache and outputs), free to change."""
    shutil.copytree(trained_template.path, tmp_path / "project", symlinks=True)
    repo = Repo(tmp_path / "project")
    repo.repro_output, repo.repro_errors = trained_template.repro_output, trained_template.repro_errors
    return repo


# `make test-fast` (pytest -m "not slow") leaves out what runs the real pipeline or trains ResNet-50 in its own
# process: tests that use a DVC project fixture, and these modules.
SLOW_FIXTURES = {"repo", "trained_repo", "trained_template"}
SLOW_MODULES = {"test_backends", "test_bench", "test_gpu_check"}


# `make test` runs the tests on two pytest-xdist workers (--dist loadgroup). The tests of the trained project
# form one group, so one worker trains it once and runs them; the longest other tests go first, so that
# neither worker is left with a long test at the end.
TRAINED_FIXTURES = {"trained_repo", "trained_template"}
LONGEST_FIRST = ("test_gpu_check", "test_backends", "test_bench")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures or item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        if TRAINED_FIXTURES & fixtures:
            item.add_marker(pytest.mark.xdist_group("trained"))

    def rank(item):
        if item.get_closest_marker("xdist_group"):  # the trained project's tests, marked above
            return 0
        name = item.module.__name__
        if name in LONGEST_FIRST:
            return 1 + LONGEST_FIRST.index(name)
        return len(LONGEST_FIRST) + (1 if item.get_closest_marker("slow") else 2)  # the other slow ones next

    items.sort(key=rank)  # stable: the collection order within each rank
