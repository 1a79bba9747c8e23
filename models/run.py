"""The one pipeline behind `iwae train` and the worker: train, evaluate, record metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.config import TrainConfig
from models.data import Mnist, binarized_test_images
from models.evaluation import evaluate
from models.files import Write, write_atomic
from models.imputation import imputation_metrics
from models.progress import Callback, after_training
from models.snr import gradient_snr
from models.storage.layout import CHECKPOINT_NAME, METRICS_NAME
from models.training import train

# Test images the gradient SNR is measured on, as one batch (Rainforth et al. measure one
# image at a time, as `iwae snr` does; a batch keeps a study cell's SNR from 100 draws less
# dependent on which image it saw).
SNR_IMAGES = 20


@dataclass
class RunResult:
    stopped: bool
    metrics: dict[str, Any] | None
    checkpoint: Path


def train_and_evaluate(
    config: TrainConfig,
    data: Mnist,
    out_dir: Path,
    callbacks: Sequence[Callback] = (),
    write: Write = write_atomic,
) -> RunResult:
    """Train (resuming from `out_dir`'s checkpoint if any), then score the test set.

    Writes `out_dir/model.safetensors` at every epoch end and `out_dir/metrics.json` at the
    end, each through `write` (see `models.files.Write`). Evaluation uses the first
    `eval_size` test images, binarized with a fixed seed, in fp32 with `eval_k` importance
    samples; callbacks see its progress as phase "eval". Then the same images with their top
    half missing score the model's imputations with K=1 and the job's K against mean and zero
    imputation (`metrics["imputation"]`, phase "impute"). With `snr_draws` > 0, last, the
    bias-corrected SNR of the encoder's and the decoder's gradient estimators of the job's
    objective and K at the trained parameters, from `snr_draws` gradients of the batch-mean
    surrogate on the first `SNR_IMAGES` of those images (`metrics["gradient_snr"]`, see
    `models.snr.gradient_snr`; Rainforth et al. 2018, section 3), phase "snr".

    `seconds_per_epoch` and `images_per_s` are training wall time per epoch and training
    images per second of it, over all epochs (resumed runs included).
    """
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT_NAME
    result = train(
        config, data.train_images, checkpoint_path=checkpoint, callbacks=callbacks, write=write
    )
    if result.stopped:
        return RunResult(stopped=True, metrics=None, checkpoint=checkpoint)
    metrics: dict[str, Any] = {
        "train_seconds": result.train_seconds,
        "epochs": result.epochs_done,
        "steps": result.steps,
        "k_per_epoch": result.k_history,
        "seconds_per_epoch": result.train_seconds / result.epochs_done,
        "images_per_s": result.images_per_epoch * result.epochs_done / result.train_seconds,
    }
    if config.k_schedule == "ess":
        metrics["ess_per_epoch"] = result.ess_history
    if config.eval_size > 0:
        device = next(result.model.parameters()).device
        test_x = binarized_test_images(data.test_images[: config.eval_size]).to(device)
        generator = torch.Generator(device).manual_seed(config.seed)
        stamped = after_training(callbacks, result.epochs_done, config.epochs)
        evaluation = evaluate(
            result.model, test_x, config.eval_k, generator=generator, callbacks=stamped
        )
        if evaluation is None:
            return RunResult(stopped=True, metrics=None, checkpoint=checkpoint)
        metrics.update(evaluation.to_dict())
        imputation = imputation_metrics(
            result.model,
            test_x,
            data.train_images[: config.train_size].mean(0).to(device),  # [D]
            sorted({1, config.k}),
            generator=torch.Generator(device).manual_seed(config.seed),
            callbacks=stamped,
        )
        if imputation is None:
            return RunResult(stopped=True, metrics=None, checkpoint=checkpoint)
        metrics["imputation"] = imputation
        if config.snr_draws > 0:
            snr = gradient_snr(
                result.model,
                test_x[:SNR_IMAGES],
                config,
                draws=config.snr_draws,
                generator=torch.Generator(device).manual_seed(config.seed),
                callbacks=stamped,
            )
            if snr is None:
                return RunResult(stopped=True, metrics=None, checkpoint=checkpoint)
            metrics["gradient_snr"] = snr.to_dict()
    write(out_dir / METRICS_NAME, json.dumps(metrics, indent=2).encode())
    return RunResult(stopped=False, metrics=metrics, checkpoint=checkpoint)
