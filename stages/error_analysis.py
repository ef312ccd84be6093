"""Stage 6: the most confident mistakes and random test samples with Grad-CAM, as image grids and a CSV."""
import json
from pathlib import Path

from pneumonia import data, errors_report, model, stage
from pneumonia.errors import PipelineError

RESIZED_DIR = Path("data/resized")
FINAL_MODEL = Path("models/model.keras")


def main(params):
    try:
        threshold = float(json.loads(Path("metrics/metrics.json").read_text())["test"]["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PipelineError(f"metrics: cannot read the threshold from metrics/metrics.json ({type(exc).__name__}); "
                            "rerun dvc repro evaluate") from None
    images, _ = data.load_split(RESIZED_DIR, "test")
    counts = errors_report.write(
        images, model.load(FINAL_MODEL), Path("metrics/predictions.csv"), threshold, params.error_analysis.cases,
        params.seed, Path("plots/errors"), Path("reports/errors.csv"),
    )
    print(f"error_analysis: at threshold {threshold:.4f}: {counts['fn']} false negatives, {counts['fp']} false positives; "
          f"Grad-CAM for {counts['gradcam']} images", flush=True)


if __name__ == "__main__":
    stage.run("error_analysis", main)
