"""`make plots`: the page renders its charts in headless Chromium with every host name unresolvable."""
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from pneumonia import plots


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, which `make test` installs where root has apt-get (Makefile, .venv/.dev)."""
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed: run `apt-get install chromium` (make test does, as root)")
    return shutil.which("chromium")


def rendered(chromium: str, page: Path, profile: Path) -> dict[str, str]:
    """The page's DOM after its scripts ran, split into the top-level plot divs (by id)."""
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}",
         "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing can be fetched from the network
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(re.findall(r'<div id="([^"]+)"(.*?)(?=<div id="|$)', proc.stdout, re.S))


def line_vertices(section: str) -> list[int]:
    return [len(re.findall("[ML]", d)) for d in re.findall(r'aria-roledescription="line mark" d="([^"]+)"', section)]


PHASES = {"train_head": "Head", "fine_tune": "Fine-tune"}
CURVES = {"loss": "loss", "auc": "AUC", "accuracy": "accuracy"}


def _write_curves(root: Path, epochs: int) -> None:
    """Both phases' training curves, through the training stages' own DVCLive writer."""
    from dvclive import Live

    from pneumonia import train

    rng = np.random.default_rng(1)
    for phase in PHASES:
        with Live(dir=str(root / "dvclive" / phase), dvcyaml=False, save_dvc_exp=False) as live:
            writer = train.LiveMetrics(live, [])
            for epoch in range(epochs):
                writer.on_epoch_end(epoch, {f"{prefix}{m}": float(rng.random()) for prefix in ("", "val_") for m in CURVES})


def test_dvc_yaml_confusion_template_is_dvcs_with_counts_on():
    """The custom template differs from DVC's confusion template only in showing the counts from the start."""
    from dvc_render.vega_templates import ConfusionTemplate

    ours = json.loads((ROOT / ".dvc/plots/confusion_counts.json").read_text())
    assert ours["params"] == [{"name": "showValues", "bind": {"input": "checkbox"}, "value": True}]
    assert ours | {"params": ConfusionTemplate.DEFAULT_CONTENT["params"]} == ConfusionTemplate.DEFAULT_CONTENT


def test_plots_page_draws_roc_confusion_counts_and_curves_offline(repo, chromium, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(0.45 * labels + 0.55 * rng.random(300), 0, 1)
    predicted = (probs >= 0.5).astype(int)
    out = repo.path / "plots"  # the evaluate stage's files, made by the same functions
    plots.roc(labels, probs, {"specificity": 0.8, "recall": 0.9, "threshold": 0.5}, out / "roc.json", out / "figures/roc.png")
    plots.precision_recall(labels, probs, out / "precision_recall.json", out / "figures/precision_recall.png")
    plots.confusion(labels, predicted, out / "confusion.json", out / "figures/confusion_matrix.png", 0.5)
    plots.reliability(labels, {"uncalibrated": probs, "calibrated": probs ** 1.2}, out, out / "figures/reliability.png")

    proc = repo.run(sys.executable, "-m", "pneumonia.plots_page", "page")
    curve_ids = [f"{PHASES[phase]}_{label}" for phase in PHASES for label in CURVES.values()]
    assert set(curve_ids) <= set(re.search(r"warning: no data yet for (.*)", proc.stderr).group(1).split(", "))

    epochs = 4
    _write_curves(repo.path, epochs)
    proc = repo.run(sys.executable, "-m", "pneumonia.plots_page", "page")
    page = repo.path / "page/index.html"
    assert page.as_uri() in proc.stdout and not set(curve_ids) & set(re.findall(r"[\w-]+", proc.stderr))
    html = page.read_text()
    scripts = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html)
    assert scripts == ["vendor/vega.min.js", "vendor/vega-lite.min.js", "vendor/vega-embed.min.js"]
    assert all((page.parent / s).stat().st_size > 10_000 for s in scripts)
    assert "//cdn" not in html and not re.search(r"(src|href)=[\"']?(https?:)?//", html)
    assert "dvclive_" not in html  # DVCLive's own one-file-per-plot curves are not on the page

    dom = rendered(chromium, page, tmp_path / "profile")
    for plot, data in ("ROC", "roc.json"), ("Precision-Recall", "precision_recall.json"):
        assert line_vertices(dom[plot]) == [len(json.loads((out / data).read_text()))], plot
    cells = re.findall(r'aria-label="predicted: (\w+); actual: (\w+); xy_count: (\d+)"[^>]*"rect mark"', dom["Confusion"])
    names = plots.CLASS_NAMES
    expected = Counter((names[p], names[a]) for p, a in zip(predicted, labels))
    assert {(p, a): int(n) for p, a, n in cells} == expected
    # The counts are written in the cells, readable without hovering.
    texts = re.findall(r'aria-label="predicted: (\w+); actual: (\w+);[^"]*"[^>]*"text mark"[^>]*>(\d+)</text>', dom["Confusion"])
    assert {(p, a): int(n) for p, a, n in texts} == expected
    assert line_vertices(dom["Calibration"])
    for phase in PHASES:  # train and validation in one plot, each line through every epoch from its own file
        for metric, label in CURVES.items():
            plot = dom[f"{PHASES[phase]}_{label}"]
            first = {f"{split}/{metric}.tsv": float((repo.path / f"dvclive/{phase}/plots/metrics/{split}/{metric}.tsv")
                                                    .read_text().splitlines()[1].split("\t")[1]) for split in ("train", "eval")}
            drawn = re.findall(rf'aria-label="[^"]*; {label}: ([\d.]+); rev: workspace; filename: ([\w/.]+)"'
                               r'[^>]*"line mark"', plot)  # a line's label shows its first point (vega rounds it)
            assert {name: float(value) for value, name in drawn} == pytest.approx(first, abs=1e-9), (phase, metric)
            assert line_vertices(plot) and set(line_vertices(plot)) == {epochs}, (phase, metric)
    images = re.findall(r'<img src="([^"]+)"', dom["plots_figures_roc_png"])
    assert images and (page.parent / images[0]).read_bytes()[:4] == b"\x89PNG"

    # Control: DVC's own page, which takes vega from the CDN, draws nothing here.
    repo.dvc("plots", "show", "-o", "cdn_page")
    assert "role-mark" not in rendered(chromium, repo.path / "cdn_page/index.html", tmp_path / "profile")["ROC"]


def test_plots_page_without_plot_data_is_one_line_error(repo):
    proc = repo.run(sys.executable, "-m", "pneumonia.plots_page", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: no plot data found; run `dvc repro` (make run) first"
