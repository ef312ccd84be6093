"""Stage 3 (phase 1): frozen ResNet-50, a new head trained on features computed once per image."""
import json
from pathlib import Path

from pneumonia import data, files, model, stage, train

RESIZED_DIR = Path("data/resized")
HEAD_MODEL = Path("models/head.keras")
HEAD_RECORD = Path("models/head.json")


def main(params):
    runtime = train.configure(params.seed, params.compute)
    print(f"train_head: {runtime.describe()}", flush=True)
    print("train_head: training the head only; the whole ResNet-50 backbone is frozen "
          f"({'ImageNet weights' if params.model.weights == 'imagenet' else 'random weights'}), BatchNorm frozen", flush=True)
    train_split, val_split = data.load_split(RESIZED_DIR, "train"), data.load_split(RESIZED_DIR, "val")
    with runtime.scope():
        net = model.build(train_split[0].shape[1], params.model.weights, params.model.dropout)
    summary = train.train_head(
        net, train_split, val_split, lr=params.lr, epochs=params.train_head.epochs, patience=params.train_head.patience,
        batch_size=params.batch_size, runtime=runtime, live_dir="dvclive/train_head",
        backup_dir=train.resume_dir("train_head", params.listed(), RESIZED_DIR),
    )
    print(f"train_head: best epoch {summary['best_epoch']}, validation AUC {summary['best_val_auc']}", flush=True)
    train.save(net, HEAD_MODEL)
    # How this model was made, from the records of its inputs: the model card states this, never params.yaml.
    record = json.loads((RESIZED_DIR / "record.json").read_text())
    record["train_head"] = {"params": params.listed(), "trained": "the head only (backbone frozen)", **summary}
    files.write_json(HEAD_RECORD, record)


if __name__ == "__main__":
    stage.run("train_head", main)
