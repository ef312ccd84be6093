"""reports/model_card.md, written from the run's own numbers.

It states only what the evaluate stage depends on: its own params, and for everything upstream the records
that the stages wrote beside their outputs (data/raw/provenance.json, models/model.json), never params.yaml,
so a param change that does not reach the model cannot leave the card stale.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pneumonia.files import write_text

ROWS = (("Sensitivity (recall)", "recall"), ("Specificity", "specificity"), ("Precision (PPV)", "precision"),
        ("F1", "f1"), ("Accuracy", "accuracy"), ("ROC AUC", "roc_auc"))


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


def _nested(stage_params: list[dict]) -> dict:
    """Stages' {dotted key: value} params merged into one params.yaml-shaped mapping.

    The stages agree where they share a key (seed, batch_size): each reran when its own params changed.
    """
    out: dict = {}
    for params in stage_params:
        for key, value in params.items():
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return out


def _schedule(lr, phase: dict) -> str:
    """How a phase's learning rate ran and how its kept epoch was chosen, from its recorded params."""
    rate = f"lr {lr}" if phase["schedule"] == "constant" else (
        f"lr {lr}, cosine decay" + (f" after {phase['warmup_epochs']} warmup epochs" if phase["warmup_epochs"] else ""))
    kept = {"val_auc": "best validation AUC", "val_loss": "best validation loss", "last": "the last epoch"}[phase["keep"]]
    averaged = f", weights averaged (EMA momentum {phase['ema']})" if phase.get("ema") else ""  # older records lack it
    smoothed = f", labels smoothed by {phase['label_smoothing']}" if phase.get("label_smoothing") else ""
    mixed = f", MixUp alpha {phase['mixup']}" if phase.get("mixup") else ""
    return f"{rate}, {phase['epochs']} epochs at most, keeping {kept}{averaged}{smoothed}{mixed}"


def _predictive_values(test: dict) -> list[str]:
    """The PPV and NPV table, with the prevalences as metrics.json keys them ("5pct")."""
    return [
        "## Predictive values at other prevalences",
        f"The test split is {_pct((test['tp'] + test['fn']) / (test['tp'] + test['fn'] + test['tn'] + test['fp']))} "
        "pneumonia; a screened population usually has less. From the test sensitivity and specificity at the operating "
        "threshold, by Bayes' rule (assuming both carry over to that population):",
        "",
        "| prevalence | PPV (flagged who have pneumonia) | NPV (cleared who do not) |",
        "|---|---|---|",
        *[f"| {key.removesuffix('pct')}% | {_pct(ppv)} | {_pct(test['npv_at_prevalence'][key])} |"
          for key, ppv in test["ppv_at_prevalence"].items()],
        "",
    ]


def _sigmoid(scale: float, offset: float) -> str:
    return f"sigmoid({scale:.4g} * logit {'-' if offset < 0 else '+'} {abs(offset):.4g})"


def _prevalence_text(cal: dict, val: dict) -> str:
    """Which share of pneumonia the calibrated probabilities are for."""
    own = (val["tp"] + val["fn"]) / (val["tp"] + val["fn"] + val["tn"] + val["fp"])
    if not cal["prevalence_shift"]:
        return f"The probabilities are for validation's share of pneumonia, {_pct(own)} (evaluate.prevalence validation). "
    return (f"The probabilities are for a population with {_pct(cal['prevalence'])} pneumonia (evaluate.prevalence): "
            f"validation's share ({_pct(own)}) replaced by Bayes' rule on the odds, exact if only the class mix differs: "
            f"the fitted log-odds move by logit({cal['prevalence']}) - logit({own:.4f}) = {cal['prevalence_shift']:.4g}, "
            f"so p = {_sigmoid(cal['scale'], cal['offset'])}. Test's share differs, so the test ECE and Brier score below "
            "judge these probabilities on another population. ")


def _tta_text(tta: dict) -> str:
    """How each validation and test image was scored (metrics.json's tta)."""
    if tta["views"] == 1:
        return "- Scoring: one logit per image, as it is (no test-time augmentation; evaluate.tta 1)."
    return (f"- Scoring: test-time augmentation (evaluate.tta {tta['views']}): each validation and test logit is the mean "
            f"over {tta['views']} views, the image and {tta['views'] - 1} fixed transformations drawn with the training "
            f"augmentation's ranges (translation {tta['translate']:g}, rotation {tta['rotate']:g} turn, zoom "
            f"{tta['zoom']:g}, contrast {tta['contrast']:g}; seed {tta['seed']}), the same for every image. The "
            "calibration and threshold were chosen on these validation logits; pneumonia.predict scores new images "
            "the same way.")


def render(result: dict, params, record: dict, provenance: dict) -> str:
    """params: the evaluate stage's own; record: models/model.json; provenance: data/raw/provenance.json."""
    test, base, val, cal = result["test"], result["test_at_0.5"], result["val"], result["calibration"]
    head, fine = record["train_head"], record["fine_tune"]
    weights, size = head["params"]["model"]["weights"], record["resize"]["image_size"]
    source_size = record["resize"].get("data.size", 28)
    counts = provenance["class_counts"]
    source = provenance.get("url") or provenance.get("path")
    plain_sigmoid = params.evaluate.calibration == "none" and not cal["prevalence_shift"]
    lines = [
        "# Model card: pneumonia screening on chest X-rays (PneumoniaMNIST)",
        "",
        "## Intended use",
        "A **screening aid** that flags pediatric chest X-rays likely to show pneumonia, for review by a clinician. "
        "The operating point favours sensitivity: a missed pneumonia costs more than a second look at a normal film. "
        "It is not a diagnostic device and has not been validated prospectively or on other hospitals' images.",
        "",
        "## Model",
        f"ResNet-50 ({'from ImageNet weights' if weights == 'imagenet' else 'from random initialisation, no pretrained weights'}), "
        f"input {size}x{size} grayscale ("
        + ("the source resolution" if size == source_size else f"{record['resize']['resize.interpolation']} upsampling from "
           f"{source_size}x{source_size}") + "), a new head "
        f"(global average pooling, dropout {head['params']['model']['dropout']}, one logit).",
        f"- Phase 1 ({_schedule(head['params']['lr'], head['params']['train_head'])}, kept epoch {head['best_epoch']}): "
        f"{head['trained']}.",
        f"- Phase 2 ({_schedule(fine['params']['fine_tune']['lr'], fine['params']['fine_tune'])}, kept epoch "
        f"{fine['best_epoch']}): {fine['trained']}.",
        _tta_text(result["tta"]),
        "",
        "## Data",
        f"PneumoniaMNIST (MedMNIST v2, licence {provenance.get('license', 'CC BY 4.0')}), derived from Kermany et al. 2018 (Cell 172): "
        "pediatric chest X-rays from Guangzhou Women and Children's Medical Center, center-cropped and downsampled to "
        f"{source_size}x{source_size}.",
        f"Source: `{source}`, MD5 `{provenance['md5']}`"
        + (f" (not the official `{provenance['official_md5']}`: a re-packed copy; its contents were validated)."
           if "warning" in provenance else " (the official file)."),
        "",
        "| split | normal | pneumonia |",
        "|---|---|---|",
        *[f"| {split} | {c['normal']} | {c['pneumonia']} |" for split, c in counts.items()],
        "",
        "## Operating threshold",
        f"**{test['threshold']:.4f}** on the {'' if plain_sigmoid else 'calibrated '}probability, chosen on the "
        f"validation split only: {_threshold_text(params)}. On validation it gives sensitivity {_pct(val['recall'])} and "
        f"specificity {_pct(val['specificity'])}. The test split was never used to choose it.",
        "",
        "## Test results",
        f"Test split: {test['tp'] + test['fn']} pneumonia, {test['tn'] + test['fp']} normal. "
        + (f"95% confidence intervals from a bootstrap ({params.evaluate.bootstrap.samples} resamples of validation and "
           "test together, each within its classes): every resample refits the calibration and re-chooses the threshold "
           "on its validation part, so the intervals include the uncertainty of the operating point."
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
        *_predictive_values(test),
        "## Confusion matrix (test, at the operating threshold)",
        "",
        "| | predicted normal | predicted pneumonia |",
        "|---|---|---|",
        f"| **actual normal** | {test['tn']} | {test['fp']} |",
        f"| **actual pneumonia** | {test['fn']} | {test['tp']} |",
        "",
        "## Calibration",
        {"temperature": f"Temperature scaling fitted on validation logits: T = {cal['temperature']}. ",
         "platt": f"Platt scaling fitted on validation logits: {_sigmoid(cal['scale'], cal['offset'] - cal['prevalence_shift'])}. ",
         "none": "No calibration (evaluate.calibration is none). "}[params.evaluate.calibration]
        + _prevalence_text(cal, val)
        + "Held-out NLL on validation (5-fold), the honest comparison of the methods: "
        + ", ".join(f"{m} {v}" for m, v in cal["cv_nll"].items()) + ". "
        + f"On test, Brier score {cal['brier_before']} before, {cal['brier_after']} after; expected calibration error (10 bins) "
        f"{cal['ece_before']} before, {cal['ece_after']} after. See `plots/figures/reliability.png`.",
        "",
        "## Known limitations",
        f"- **Downsampled sources.** The images are {source_size}x{source_size}"
        + (f", upsampled to {size}x{size}" if size != source_size else "")
        + "; fine detail of a real radiograph is gone, and the model has never seen it.",
        "- **Validation/test shift.** MedMNIST's validation split is a 10% slice of the source's training set, while the test split is "
        "the source's separate test set, which is known to differ (a larger share of normals, different acquisition). A threshold "
        "tuned on validation can land at a different sensitivity on test: compare the validation figures under "
        "'Operating threshold' with the test results.",
        "- **One center, pediatric patients.** Performance on adults or other hospitals is unknown.",
        "- **Small test set.** 624 images: read the confidence intervals, not just the point estimates.",
        "",
        "## Reproduce",
        "The params this run depends on, as each stage recorded them (the part of params.yaml that made these results):",
        "",
        "```yaml",
        yaml.safe_dump(_nested([{"data.source": provenance.get("path", provenance["source"])}, record["resize"],
                                head["params"], fine["params"], params.listed()]), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write(path: Path, result: dict, params, record: dict, provenance: dict) -> None:
    write_text(path, render(result, params, record, provenance))
