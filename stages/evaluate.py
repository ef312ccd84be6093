"""Stage 5: threshold on validation, calibrated test metrics with CIs, curves, and the model card."""
import json
from pathlib import Path

from pneumonia import card, data, evaluate, model, stage

RESIZED_DIR = Path("data/resized")
FINAL_MODEL = Path("models/model.keras")


def main(params):
    net = model.load(FINAL_MODEL)
    val, test = data.load_split(RESIZED_DIR, "val"), data.load_split(RESIZED_DIR, "test")
    tta = evaluate.tta_record(params)
    result = evaluate.evaluate(
        val, test, evaluate.logits(net, val[0], params.batch_size, "val", tta),
        evaluate.logits(net, test[0], params.batch_size, "test", tta),
        params, Path("metrics/metrics.json"), Path("metrics/predictions.csv"), Path("plots"),
    )
    record = json.loads(Path("models/model.json").read_text())
    provenance = json.loads(Path("data/raw/provenance.json").read_text())
    card.write(Path("reports/model_card.md"), result, params, record, provenance)
    t = result["test"]
    print(f"evaluate: threshold {t['threshold']:.4f}: sensitivity {t['recall']}, specificity {t['specificity']}, "
          f"F1 {t['f1']}, ROC AUC {t['roc_auc']} (FP {t['fp']}, FN {t['fn']})", flush=True)


if __name__ == "__main__":
    stage.run("evaluate", main)
