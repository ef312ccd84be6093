"""Stage 5: threshold on validation, calibrated test metrics with CIs, curves, and the model card."""
import json

from pneumonia import card, data, evaluate, model, stage
from pneumonia.files import (FINAL_MODEL, FINAL_RECORD, METRICS, MODEL_CARD, PLOTS_DIR, PREDICTIONS,
                             PROVENANCE, RESIZED_DIR)


def main(params):
    net = model.logits_model(model.load(FINAL_MODEL), FINAL_MODEL)  # one for both splits: traced once
    val, test = data.load_split(RESIZED_DIR, "val"), data.load_split(RESIZED_DIR, "test")
    tta = evaluate.tta_record(params)
    result = evaluate.evaluate(
        val, test, evaluate.logits(net, val[0], params.batch_size, "val", tta),
        evaluate.logits(net, test[0], params.batch_size, "test", tta),
        params, METRICS, PREDICTIONS, PLOTS_DIR,
    )
    record = json.loads(FINAL_RECORD.read_text())
    provenance = json.loads(PROVENANCE.read_text())
    card.write(MODEL_CARD, result, params, record, provenance)
    t = result["test"]
    print(f"evaluate: threshold {t['threshold']:.4f}: sensitivity {t['recall']}, specificity {t['specificity']}, "
          f"F1 {t['f1']}, ROC AUC {t['roc_auc']} (FP {t['fp']}, FN {t['fn']})", flush=True)


if __name__ == "__main__":
    stage.run("evaluate", main)
