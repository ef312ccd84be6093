"""Error analysis: which test images the model gets most confidently wrong, and where it looked (Grad-CAM).

Grad-CAM costs a forward and a partial backward pass per image, slow on a CPU,
so it runs only for the images in the grids plus, for the summary figure, a
seeded sample of at most SUMMARY_CAP true positives and SUMMARY_CAP false
positives. reports/errors.csv lists every error; heat_outside_lung is the share
of its heatmap outside the centered lung box (pneumonia.gradcam), "nan" for an
all-zero map, and empty for an error without a heatmap (a false negative not
shown in a grid, or a false positive left out of the sample when there are more
than SUMMARY_CAP).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pneumonia import gradcam, plots
from pneumonia.evaluate import read_predictions
from pneumonia.files import write_text

TITLES = {
    "false_negatives": "Most confident false negatives (pneumonia called normal)",
    "false_positives": "Most confident false positives (normal called pneumonia)",
    "random_samples": "Random test images",
}
SUMMARY_CAP = 200  # Grad-CAM images per group of the summary figure


def select(labels, probs, threshold: float, cases: int, seed: int) -> dict[str, np.ndarray]:
    """All false negatives and false positives, most confident first, and a seeded random sample of `cases`."""
    predicted = probs >= threshold
    fn = np.flatnonzero((labels == 1) & ~predicted)
    fp = np.flatnonzero((labels == 0) & predicted)
    rng = np.random.default_rng(seed)
    return {
        "false_negatives": fn[np.argsort(probs[fn], kind="stable")],  # lowest probability first
        "false_positives": fp[np.argsort(-probs[fp], kind="stable")],  # highest probability first
        "random_samples": np.sort(rng.choice(len(labels), size=min(cases, len(labels)), replace=False)),
    }


def _sample(indices: np.ndarray, cap: int, rng) -> np.ndarray:
    return np.sort(rng.choice(indices, size=min(cap, len(indices)), replace=False))


def write(images, model, predictions_csv: Path, threshold: float, cases: int, seed: int, grid_dir: Path,
          errors_csv: Path) -> dict:
    labels, probs = read_predictions(predictions_csv, "test")
    chosen = select(labels, probs, threshold, cases, seed)
    shown = {name: chosen[name][:cases] for name in TITLES}
    true_positives = np.flatnonzero((labels == 1) & (probs >= threshold))
    rng = np.random.default_rng([seed, 1])  # a stream of its own: select's random sample stays as it was
    summary = {"true positives": _sample(true_positives, SUMMARY_CAP, rng),
               "false positives": _sample(chosen["false_positives"], SUMMARY_CAP, rng)}
    needed = np.unique(np.concatenate([*shown.values(), *summary.values()]))
    heatmap = dict(zip(needed.tolist(), gradcam.heatmaps(model, images[needed])))

    for name, title in TITLES.items():
        idx = shown[name]
        captions = [f"#{i} {plots.CLASS_NAMES[labels[i]]}\np={probs[i]:.3f}" for i in idx]
        plots.gradcam_grid(images[idx], [heatmap[i] for i in idx], captions, f"{title}, threshold {threshold:.3f}",
                           grid_dir / f"{name}.png")
    plots.gradcam_summary({group: np.array([heatmap[i] for i in idx]) for group, idx in summary.items()},
                          gradcam.lung_box(*images.shape[1:3]), grid_dir / "gradcam_summary.png")

    table = pd.concat([
        pd.DataFrame({"index": chosen[kind], "label": labels[chosen[kind]], "probability": probs[chosen[kind]],
                      "error": kind.replace("_", " ")[:-1], "confidence_rank": np.arange(1, len(chosen[kind]) + 1),
                      "heat_outside_lung": [f"{gradcam.heat_outside_lung(heatmap[i]):.4f}" if i in heatmap else ""
                                            for i in chosen[kind].tolist()]})
        for kind in ("false_negatives", "false_positives")
    ])
    write_text(errors_csv, table.to_csv(index=False, lineterminator="\n"))  # probabilities exact, as in predictions.csv
    return {"fn": len(chosen["false_negatives"]), "fp": len(chosen["false_positives"]), "gradcam": len(needed)}
