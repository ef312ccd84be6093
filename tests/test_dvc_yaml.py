"""dvc.yaml lists exactly the code and params each stage uses, so DVC reruns exactly what changed."""
import modulefinder
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from pneumonia import codedeps, params as params_lib

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
CODE_DIRS = ("pneumonia/", "stages/")


def _code_deps(stage: str) -> list[str]:
    return sorted(d for d in STAGES[stage]["deps"] if d.startswith(CODE_DIRS) and d.endswith(".py"))


def test_every_stage_runs_its_script():
    assert list(STAGES) == ["download", "resize", "train_head", "fine_tune", "evaluate", "error_analysis"]
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"python -m stages.{name}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure(stage):
    """Every project module the stage imports, directly or not (in functions too), and nothing else."""
    assert _code_deps(stage) == codedeps.stage_code(stage)


class ProjectFinder(modulefinder.ModuleFinder):
    """The standard library's bytecode scan, following only the project's own packages."""

    def find_module(self, name, path, parent=None):
        if parent is None and name not in (*codedeps.PACKAGES, "__init__"):
            raise ImportError(name)  # third-party and standard modules: not project code
        return super().find_module(name, path, parent)


@pytest.mark.parametrize("stage", list(STAGES))
def test_import_closure_agrees_with_modulefinder(stage):
    """An independent reading of the same closure, from bytecode instead of pneumonia.codedeps's syntax tree."""
    finder = ProjectFinder(path=[str(ROOT)])
    finder.run_script(str(ROOT / "stages" / f"{stage}.py"))
    found = {Path(m.__file__).relative_to(ROOT).as_posix()
             for name, m in finder.modules.items()
             if name != "__main__" and m.__file__}
    found.add(f"stages/{stage}.py")
    found.add("stages/__init__.py")  # `python -m stages.x` imports the package first; run_script does not
    assert sorted(found) == codedeps.stage_code(stage)


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_are_exactly_what_the_stage_reads(stage):
    assert tuple(STAGES[stage]["params"]) == params_lib.STAGE_PARAMS[stage]


def test_a_stage_cannot_read_a_param_it_does_not_list():
    view = params_lib.for_stage(params_lib.Params(), "train_head")
    assert view.compute.mixed_precision == "auto" and view.model.dropout == 0.2 and view.lr == 1e-4
    with pytest.raises(AttributeError, match="train_head reads compute.cache_dtype"):
        view.compute.cache_dtype
    with pytest.raises(AttributeError, match="train_head reads fine_tune"):
        view.fine_tune
    evaluate = params_lib.for_stage(params_lib.Params(), "evaluate")
    assert evaluate.listed() == {"seed": 42, "batch_size": 32, "augment.translate": 0.08, "augment.rotate": 0.03,
                                 "augment.zoom": 0.1, "augment.contrast": 0.15,
                                 "evaluate": params_lib.as_dict(params_lib.Params().evaluate)}
    with pytest.raises(AttributeError, match="evaluate reads model"):
        evaluate.model
    with pytest.raises(AttributeError, match="evaluate reads augment.views"):  # the training views are not evaluate's
        evaluate.augment.views


def test_no_output_path_is_committed_without_the_lock_of_its_run():
    """Committed outputs must come from one run of the committed code and params.yaml, with its dvc.lock."""
    import subprocess

    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = proc.stdout.splitlines()
    outs = [next(iter(o)) if isinstance(o, dict) else o for stage in STAGES.values() for o in stage.get("outs", [])]
    committed = [f for f in tracked if any(f == o or f.startswith(o.rstrip("/") + "/") for o in outs)]
    if "dvc.lock" not in tracked:
        assert committed == [], "outputs committed without the dvc.lock of the run that made them"
