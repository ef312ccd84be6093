"""Test metrics across experiments, e.g. one per seed: mean ± sample std, from `dvc exp show --json`.

    dvc exp run -n seed-1 -S seed=1      (seed-2, seed-3, ... likewise)
    python -m pneumonia.report [EXPERIMENT ...]

With no names: every experiment of the current commit that has metrics, as `dvc exp show` lists them.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from pneumonia.errors import PipelineError

METRICS_FILE = "metrics/metrics.json"
METRICS = ("test.recall", "test.specificity", "test.precision", "test.f1", "test.roc_auc", "test.pr_auc",
           "test.threshold")


def exp_show() -> list:
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise PipelineError(f"dvc exp show failed: {lines[-1]}")
    return json.loads(proc.stdout)


def experiments(shown: list) -> dict[str, dict | None]:
    """Experiment name -> the data of its metrics.json (None when it has none: failed, queued)."""
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                metrics = ((rev.get("data") or {}).get("metrics") or {}).get(METRICS_FILE) or {}
                found[exp.get("name") or rev.get("name") or rev["rev"][:7]] = metrics.get("data")
    return found


def _value(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data.get(key) if isinstance(data, dict) else None
    return data


def summarize(found: dict[str, dict | None], names: list[str]) -> tuple[list[str], pd.DataFrame]:
    """(the experiments used, a table of metric -> mean, sample std, count); every named one must have metrics."""
    if not found:
        raise PipelineError("no experiments found; run some first, e.g. dvc exp run -S seed=1")
    unknown = [n for n in names if n not in found]
    if unknown:
        raise PipelineError(f"unknown experiment {', '.join(unknown)}; known: {', '.join(sorted(found))}")
    no_metrics = [n for n in names if found[n] is None]
    if no_metrics:
        raise PipelineError(f"experiment {', '.join(no_metrics)} has no {METRICS_FILE} (failed or still queued?)")
    used = sorted(names or [n for n, data in found.items() if data is not None])
    if not used:
        raise PipelineError(f"no experiment has {METRICS_FILE} yet")
    # Experiments x metrics; a missing or non-numeric value (pr_auc is null with one class) is NaN and not counted.
    table = pd.DataFrame.from_dict(
        {n: {m: v for m in METRICS if _is_number(v := _value(found[n], m))} for n in used},
        orient="index", columns=list(METRICS), dtype=float,
    )
    stats = table.agg(["mean", "std", "count"]).T  # pandas' std is the sample std (ddof=1): NaN for one value
    return used, stats.astype({"count": int})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_report(used: list[str], stats: pd.DataFrame) -> str:
    shown = pd.DataFrame({"mean": stats["mean"], "±": "±", "std": stats["std"], "n": stats["count"]})
    table = shown.to_string(float_format="{:.4f}".format, na_rep="n/a", header=["mean", "", "std", "n"])
    return f"{len(used)} experiment(s): {', '.join(used)}\n{table}"


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip())
        return 0
    if any(a.startswith("-") for a in argv):
        print("usage: python -m pneumonia.report [EXPERIMENT ...]", file=sys.stderr)
        return 2
    try:
        used, stats = summarize(experiments(exp_show()), list(dict.fromkeys(argv)))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_report(used, stats))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
