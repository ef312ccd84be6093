"""The project's own source files a stage runs: the import closure of stages/<stage>.py, read from the source.

dvc.yaml lists exactly these as each stage's code deps (tests/test_dvc_yaml.py holds them equal), and a
training stage's resume key includes their content, so a checkpoint made by other code is never loaded.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pneumonia", "stages")


def _source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported(path: Path, module: str) -> set[str]:
    """Every module name an import statement anywhere in `path` (functions included) may load."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pneumonia import data` loads a module
    return names


def closure(module: str) -> list[str]:
    """Project source files (relative posix paths, sorted) that running `python -m module` imports."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in PACKAGES:
            continue
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            prefix = ".".join(parts[:i])
            path = _source(prefix)
            if path is not None and prefix not in seen:
                seen[prefix] = path
                todo.extend(_imported(path, prefix))
    return sorted(path.relative_to(ROOT).as_posix() for path in seen.values())


def stage_code(stage: str) -> list[str]:
    return closure(f"stages.{stage}")
