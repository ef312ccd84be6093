"""Stage 4 (phase 2): unfreeze from fine_tune.unfreeze_from up; the frozen prefix runs once per image."""
from pathlib import Path

from pneumonia import data, model, stage, train

RESIZED_DIR = Path("data/resized")
HEAD_MODEL = Path("models/head.keras")
FINAL_MODEL = Path("models/model.keras")


def main(params):
    runtime = train.configure(params.seed, params.compute)
    print(f"fine_tune: {runtime.describe()}", flush=True)
    train_split, val_split = data.load_split(RESIZED_DIR, "train"), data.load_split(RESIZED_DIR, "val")
    with runtime.scope():
        net = model.load(HEAD_MODEL)
    summary = train.fine_tune(
        net, train_split, val_split, block=params.fine_tune.unfreeze_from,
        # Without pretrained weights there are no statistics to protect, so BatchNorm learns too.
        train_batchnorm=params.model.weights == "none", cache_dtype=params.compute.cache_dtype,
        lr=params.fine_tune.lr, epochs=params.fine_tune.epochs, patience=params.fine_tune.patience,
        batch_size=params.batch_size, runtime=runtime, live_dir="dvclive/fine_tune",
        backup_dir=train.resume_dir("fine_tune", params, RESIZED_DIR, HEAD_MODEL),
    )
    print(f"fine_tune: best epoch {summary['best_epoch']}, validation AUC {summary['best_val_auc']}", flush=True)
    train.save(net, FINAL_MODEL)


if __name__ == "__main__":
    stage.run("fine_tune", main)
