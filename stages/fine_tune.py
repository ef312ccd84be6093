"""Stage 4 (phase 2): unfreeze from fine_tune.unfreeze_from up; the frozen prefix runs once per image."""
import json

from pneumonia import augment, data, files, model, params as params_lib, stage, train
from pneumonia.files import FINAL_MODEL, FINAL_RECORD, HEAD_MODEL, HEAD_RECORD, RESIZED_DIR


def main(params):
    runtime = train.configure(params.seed, params.compute)
    print(f"fine_tune: {runtime.describe()}", flush=True)
    block = params_lib.unfreeze_block(params.fine_tune.unfreeze_from, params.model.weights)
    # Without pretrained weights there are no statistics to protect, so BatchNorm learns too.
    train_batchnorm = params.model.weights == "none"
    trained = model.describe_trainable(block, params.model.weights, train_batchnorm)
    trained += "; training images " + augment.describe(params.augment, frozen_prefix=block != "conv1")
    print(f"fine_tune: {trained}", flush=True)
    train_split, val_split = data.load_split(RESIZED_DIR, "train"), data.load_split(RESIZED_DIR, "val")
    with runtime.scope():
        net = model.load(HEAD_MODEL, for_training=True)
    summary = train.fine_tune(
        net, train_split, val_split, block=block, train_batchnorm=train_batchnorm,
        cache_dtype=params.compute.cache_dtype, augment=params.augment if params.augment.enabled else None,
        lr=params.fine_tune.lr, epochs=params.fine_tune.epochs,
        patience=params.fine_tune.patience, schedule=params.fine_tune.schedule,
        warmup_epochs=params.fine_tune.warmup_epochs, keep=params.fine_tune.keep, ema=params.fine_tune.ema,
        label_smoothing=params.fine_tune.label_smoothing, mixup=params.fine_tune.mixup,
        batch_size=params.batch_size,
        runtime=runtime,
        live_dir="dvclive/fine_tune",
        backup_dir=train.resume_dir("fine_tune", params.listed(), RESIZED_DIR, HEAD_MODEL, HEAD_RECORD,
                                    runtime=runtime),
    )
    print(f"fine_tune: kept epoch {summary['best_epoch']} (by {params.fine_tune.keep}), "
          f"validation AUC {summary['best_val_auc']}", flush=True)
    train.save(net, FINAL_MODEL)
    record = json.loads(HEAD_RECORD.read_text())
    record["fine_tune"] = {"params": params.listed(), "unfreeze_from": block, "batchnorm_trained": train_batchnorm,
                           "trained": trained, **summary}
    files.write_json(FINAL_RECORD, record)


if __name__ == "__main__":
    stage.run("fine_tune", main)
