"""Curve data for `dvc plots` (JSON records) and the PNG figures people read."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
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


def gradcam_grid(images, heatmaps, captions, title: str, png_path: Path, pairs_per_row: int = 3) -> None:
    """Each case as two tiles, the image (captioned) and its Grad-CAM overlay; an empty selection still gives a labelled figure."""
    rows = max(1, int(np.ceil(len(images) / pairs_per_row)))
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(pairs_per_row * 3.8, rows * 2.1 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    pairs = axes.reshape(rows * pairs_per_row, 2)
    for (ax_image, ax_overlay), image, heatmap, caption in zip(pairs, images, heatmaps, captions):
        ax_image.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255)
        ax_image.set_title(caption, fontsize=7)
        ax_overlay.imshow(np.squeeze(image), cmap="gray", vmin=0, vmax=255)
        ax_overlay.imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=0.4)
        ax_overlay.set_title("Grad-CAM", fontsize=7)
    fig.suptitle(title if len(images) else f"{title}: none", fontsize=10)
    _save(fig, png_path)


def gradcam_summary(groups: dict, box: tuple[int, int, int, int], png_path: Path) -> None:
    """Mean Grad-CAM per group (name -> (N, H, W) heatmaps), with the box used for heat_outside_lung."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 4.3), squeeze=False)
    top, bottom, left, right = box
    for ax, (name, maps) in zip(axes.flat, groups.items()):
        ax.axis("off")
        if len(maps) == 0:
            ax.set_title(f"{name}: none", fontsize=9)
            continue
        ax.imshow(maps.mean(axis=0), cmap="jet", vmin=0, vmax=1)
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, ec="white", ls="--"))
        ax.set_title(f"{name} (n={len(maps)})", fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle("Mean Grad-CAM of the pneumonia logit (dashed: lung box)", fontsize=10)
    _save(fig, png_path)
