"""Stage 3 (phase 1): frozen ResNet-50, a new head trained on features computed once per image."""
import json

from pneumonia import augment, data, files, model, stage, train
from pneumonia.files import HEAD_MODEL, HEAD_RECORD, RESIZED_DIR


def main(params):
    runtime = train.configure(params.seed, params.compute)
    print(f"train_head: {runtime.describe()}", flush=True)
    if params.train_head.epochs:
        print("train_head: training the head only; the whole ResNet-50 backbone is frozen "
              f"({'ImageNet weights' if params.model.weights == 'imagenet' else 'random weights'}), BatchNorm frozen",
              flush=True)
    train_split, val_split = data.load_split(RESIZED_DIR, "train"), data.load_split(RESIZED_DIR, "val")
    with runtime.scope():
        net = model.build(train_split[0].shape[1], params.model.weights, params.model.dropout)
    phase = params.train_head
    summary = train.train_head(
        net, train_split, val_split, lr=params.lr, epochs=phase.epochs, patience=phase.patience,
        schedule=phase.schedule, warmup_epochs=phase.warmup_epochs, keep=phase.keep, ema=phase.ema,
        label_smoothing=phase.label_smoothing, mixup=phase.mixup,
        batch_size=params.batch_size, augment=params.augment if params.augment.enabled else None,
        runtime=runtime, live_dir="dvclive/train_head",
        backup_dir=train.resume_dir("train_head", params.listed(), RESIZED_DIR, runtime=runtime),
    )
    if phase.epochs:
        trained = "the head only (backbone frozen); training images " + augment.describe(params.augment, True)
        print(f"train_head: kept epoch {summary['best_epoch']} (by {phase.keep}), "
              f"validation AUC {summary['best_val_auc']}", flush=True)
    else:
        trained = "skipped (train_head.epochs is 0): phase 2 starts from the untrained head"
        print(f"train_head: {trained}", flush=True)
    train.save(net, HEAD_MODEL)
    # How this model was made, from the records of its inputs: the model card states this, never params.yaml.
    record = json.loads((RESIZED_DIR / "record.json").read_text())
    record["train_head"] = {"params": params.listed(), "trained": trained, **summary}
    files.write_json(HEAD_RECORD, record)


if __name__ == "__main__":
    stage.run("train_head", main)
