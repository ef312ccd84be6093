"""Stage 6: the most confident mistakes and random test samples with Grad-CAM, as image grids and a CSV."""
from pneumonia import data, errors_report, files, model, stage
from pneumonia.files import ERRORS_CSV, ERRORS_DIR, FINAL_MODEL, METRICS, PREDICTIONS, RESIZED_DIR


def main(params):
    threshold = files.read_operating_point(METRICS)[0]
    images, _ = data.load_split(RESIZED_DIR, "test")
    counts = errors_report.write(
        images, model.load(FINAL_MODEL), PREDICTIONS, threshold, params.error_analysis.cases,
        params.seed, ERRORS_DIR, ERRORS_CSV,
    )
    print(f"error_analysis: at threshold {threshold:.4f}: {counts['fn']} false negatives, {counts['fp']} false positives; "
          f"Grad-CAM for {counts['gradcam']} images", flush=True)


if __name__ == "__main__":
    stage.run("error_analysis", main)
