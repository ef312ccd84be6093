"""Error analysis: which test images the model gets most confidently wrong."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from pneumonia import plots
from pneumonia.evaluate import read_predictions
from pneumonia.files import write_text

TITLES = {
    "false_negatives": "Most confident false negatives (pneumonia called normal)",
    "false_positives": "Most confident false positives (normal called pneumonia)",
    "random_samples": "Random test images",
}


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


def write(images, predictions_csv: Path, threshold: float, cases: int, seed: int, grid_dir: Path, errors_csv: Path) -> dict:
    labels, probs = read_predictions(predictions_csv, "test")
    chosen = select(labels, probs, threshold, cases, seed)
    for name, title in TITLES.items():
        idx = chosen[name][:cases]
        captions = [f"#{i} {plots.CLASS_NAMES[labels[i]]}\np={probs[i]:.3f}" for i in idx]
        plots.image_grid(images[idx], captions, f"{title}, threshold {threshold:.3f}", grid_dir / f"{name}.png")

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["index", "label", "probability", "error", "confidence_rank"])
    for kind in ("false_negatives", "false_positives"):
        for rank, i in enumerate(chosen[kind], 1):
            writer.writerow([int(i), int(labels[i]), f"{probs[i]:.6f}", kind.replace("_", " ")[:-1], rank])
    write_text(errors_csv, out.getvalue())
    return {"fn": len(chosen["false_negatives"]), "fp": len(chosen["false_positives"])}
