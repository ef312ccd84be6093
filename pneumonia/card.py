"""reports/model_card.md, written from the run's own numbers."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from pneumonia.files import write_text
from pneumonia.params import as_dict

ROWS = (("Sensitivity (recall)", "recall"), ("Specificity", "specificity"), ("Precision (PPV)", "precision"),
        ("F1", "f1"), ("Accuracy", "accuracy"), ("ROC AUC", "roc_auc"))


def _git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
        return rev + (" (with uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _threshold_text(params) -> str:
    t = params.evaluate.threshold
    return {
        "target_sensitivity": f"the highest threshold whose validation sensitivity is at least {_pct(t.target_sensitivity)}, "
        "which gives the best specificity at that sensitivity",
        "youden": "the validation point maximising sensitivity + specificity - 1 (Youden's J)",
        "fixed": f"fixed by hand at {t.value}",
    }[t.strategy]


def render(result: dict, params, provenance: dict) -> str:
    test, base, val, cal = result["test"], result["test_at_0.5"], result["val"], result["calibration"]
    counts = provenance["class_counts"]
    source = provenance.get("url") or provenance.get("path")
    lines = [
        "# Model card: pneumonia screening on chest X-rays (PneumoniaMNIST)",
        "",
        "## Intended use",
        "A **screening aid** that flags pediatric chest X-rays likely to show pneumonia, for review by a clinician. "
        "The operating point favours sensitivity: a missed pneumonia costs more than a second look at a normal film. "
        "It is not a diagnostic device and has not been validated prospectively or on other hospitals' images.",
        "",
        "## Model",
        f"ResNet-50 ({'ImageNet weights' if params.model.weights == 'imagenet' else 'trained from scratch, no pretrained weights'}), "
        f"input {params.image_size}x{params.image_size} grayscale, a new head (global average pooling, dropout {params.model.dropout}, "
        f"one logit). Phase 1 trains the head (lr {params.lr}); phase 2 fine-tunes from `{params.fine_tune.unfreeze_from}` up "
        f"(lr {params.fine_tune.lr}).",
        "",
        "## Data",
        f"PneumoniaMNIST (MedMNIST v2, licence {provenance.get('license', 'CC BY 4.0')}), derived from Kermany et al. 2018 (Cell 172): "
        "pediatric chest X-rays from Guangzhou Women and Children's Medical Center, center-cropped and downsampled to 28x28.",
        f"Source: `{source}`, MD5 `{provenance['md5']}`"
        + (f" (not the official `{provenance['official_md5']}`: a re-packed copy; its contents were validated)."
           if "warning" in provenance else " (the official file)."),
        "",
        "| split | normal | pneumonia |",
        "|---|---|---|",
        *[f"| {split} | {c['normal']} | {c['pneumonia']} |" for split, c in counts.items()],
        "",
        "## Operating threshold",
        f"**{test['threshold']:.4f}** on the {'calibrated ' if params.evaluate.calibration == 'temperature' else ''}probability, chosen on the "
        f"validation split only: {_threshold_text(params)}. On validation it gives sensitivity {_pct(val['recall'])} and "
        f"specificity {_pct(val['specificity'])}. The test split was never used to choose it.",
        "",
        "## Test results",
        f"Test split: {test['tp'] + test['fn']} pneumonia, {test['tn'] + test['fp']} normal. "
        + (f"95% confidence intervals from a stratified bootstrap ({params.evaluate.bootstrap.samples} resamples)."
           if params.evaluate.bootstrap.samples else "No bootstrap intervals (evaluate.bootstrap.samples is 0)."),
        "",
        f"| metric | at threshold {test['threshold']:.4f} | 95% CI | at 0.5, uncalibrated (as the reference notebook) |",
        "|---|---|---|---|",
    ]
    for name, key in ROWS:
        fmt = (lambda x: "n/a" if x is None else f"{x:.3f}") if key == "roc_auc" else _pct
        ci = test.get(f"{key}_ci")
        ci_text = f"{fmt(ci[0])} to {fmt(ci[1])}" if ci else "n/a"
        lines.append(f"| {name} | {fmt(test[key])} | {ci_text} | {fmt(base[key])} |")
    lines += [
        f"| False positives | {test['fp']} | | {base['fp']} |",
        f"| False negatives | {test['fn']} | | {base['fn']} |",
        "",
        "## Confusion matrix (test, at the operating threshold)",
        "",
        "| | predicted normal | predicted pneumonia |",
        "|---|---|---|",
        f"| **actual normal** | {test['tn']} | {test['fp']} |",
        f"| **actual pneumonia** | {test['fn']} | {test['tp']} |",
        "",
        "## Calibration",
        (f"Temperature scaling fitted on validation logits: T = {cal['temperature']}. " if params.evaluate.calibration == "temperature"
         else "No calibration (evaluate.calibration is none). ")
        + f"On test, Brier score {cal['brier_before']} before, {cal['brier_after']} after; expected calibration error (10 bins) "
        f"{cal['ece_before']} before, {cal['ece_after']} after. See `plots/figures/reliability.png`.",
        "",
        "## Known limitations",
        "- **Upsampled inputs.** The images are 28x28 and are upsampled to "
        f"{params.image_size}x{params.image_size}; fine detail of a real radiograph is gone, and the model has never seen it.",
        "- **Validation/test shift.** MedMNIST's validation split is a 10% slice of the source's training set, while the test split is "
        "the source's separate test set, which is known to differ (a larger share of normals, different acquisition). A threshold "
        "tuned on validation can land at a different sensitivity on test: compare the validation figures under "
        "'Operating threshold' with the test results.",
        "- **One center, pediatric patients.** Performance on adults or other hospitals is unknown.",
        "- **Small test set.** 624 images: read the confidence intervals, not just the point estimates.",
        "",
        "## Reproduce",
        f"Git revision {_git_revision()}. Params:",
        "",
        "```yaml",
        yaml.safe_dump(as_dict(params), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write(path: Path, result: dict, params, provenance: dict) -> None:
    write_text(path, render(result, params, provenance))
