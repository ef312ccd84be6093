"""Curve data for `dvc plots` (JSON records) and the PNG figures people read."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402

from pneumonia.files import atomic_path, write_json  # noqa: E402

CLASS_NAMES = ("normal", "pneumonia")


def _r(values) -> list:
    return [round(float(v), 4) for v in values]


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def roc(labels, probs, operating: dict, data_path: Path, png_path: Path) -> None:
    fpr, tpr, thr = skm.roc_curve(labels, probs)
    thr = np.minimum(thr, 1.0)  # roc_curve's first threshold is +inf, which is not JSON
    write_json(data_path, [{"fpr": f, "tpr": t, "threshold": h} for f, t, h in zip(_r(fpr), _r(tpr), _r(thr))])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"ROC (AUC {skm.roc_auc_score(labels, probs):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    op_fpr = 1 - operating["specificity"]
    ax.scatter([op_fpr], [operating["recall"]], c="red", zorder=3,
               label=f"operating point (threshold {operating['threshold']:.3f})")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)", title="ROC, test split")
    ax.legend(loc="lower right")
    _save(fig, png_path)


def precision_recall(labels, probs, data_path: Path, png_path: Path) -> None:
    precision, recall, thr = skm.precision_recall_curve(labels, probs)
    thr = np.append(thr, 1.0)  # one threshold fewer than points
    write_json(data_path, [{"recall": r, "precision": p, "threshold": h} for r, p, h in zip(_r(recall), _r(precision), _r(thr))])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(recall, precision, label=f"PR (AP {skm.average_precision_score(labels, probs):.3f})")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", title="Precision-recall, test split", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    _save(fig, png_path)


def confusion(labels, predicted, data_path: Path, png_path: Path, threshold: float) -> None:
    write_json(data_path, [{"actual": CLASS_NAMES[a], "predicted": CLASS_NAMES[p]} for a, p in zip(labels, predicted)])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    skm.ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=[0, 1], display_labels=CLASS_NAMES, cmap="Blues", colorbar=False, ax=ax
    )  # writes the counts in the cells
    ax.set_title(f"Confusion matrix, test (threshold {threshold:.3f})")
    _save(fig, png_path)


def reliability(labels, curves: dict, data_dir: Path, png_path: Path, bins: int = 10) -> None:
    """One JSON per curve (name -> probabilities) and one figure with all of them."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="perfect calibration")
    for name, probs in curves.items():
        observed, predicted = calibration_curve(labels, probs, n_bins=bins, strategy="uniform")
        write_json(data_dir / f"calibration_{name}.json",
                   [{"predicted": p, "observed": o} for p, o in zip(_r(predicted), _r(observed))])
        ax.plot(predicted, observed, marker="o", label=name)
    ax.set(xlabel="mean predicted probability", ylabel="observed pneumonia rate", title="Reliability, test split")
    ax.legend(loc="upper left")
    _save(fig, png_path)


def image_grid(images, captions, title: str, png_path: Path, columns: int = 6) -> None:
    """Tiles of grayscale images with a caption each; an empty selection still gives a labelled figure."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title if len(images) else f"{title}: none", fontsize=10)
    _save(fig, png_path)
