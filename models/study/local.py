"""The study the service exists for: how K changes what IWAE learns.

For each K, train the same configuration, then measure the test log-likelihood bound, the
active units, the training time, and the signal-to-noise ratio of the encoder's and the
decoder's gradient estimates at the trained parameters (Rainforth et al., 2018).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import load_model
from models.config import TrainConfig
from models.data import Mnist, binarized_test_images
from models.estimators import gradient_snr
from models.run import train_and_evaluate
from models.training import TrainCallback, resolve_device


@dataclass
class StudyRow:
    """One K of the study; log-likelihoods in nats per test image (IWAE bound, `eval_k`).

    `imputation` is the run's `metrics["imputation"]` (`models.imputation`), None when the
    run was not evaluated.
    """

    k: int
    objective: str
    test_loglik: float | None
    test_loglik_std_error: float | None
    active_units: list[int] | None
    train_seconds: float
    snr_encoder: float  # median over parameters of the bias-corrected SNR
    snr_decoder: float
    alpha: float | None = None  # VR-IWAE objectives only
    imputation: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_study(
    base: TrainConfig,
    ks: Sequence[int],
    data: Mnist,
    out_dir: Path,
    *,
    alphas: Sequence[float] | None = None,
    snr_draws: int = 100,
    snr_batch: int = 20,
    callbacks: Sequence[TrainCallback] = (),
) -> list[StudyRow] | None:
    """Train `base` once per K under `out_dir/k{K}` (resuming finished or partial runs).

    With `alphas` (VR-IWAE objectives), once per alpha and K under `out_dir/alpha{a}-k{K}`,
    alpha-major. Gradient SNR uses `snr_draws` estimates on the first `snr_batch` binarized
    test images. Returns None when a callback stopped a run.
    """
    if alphas:
        grid = [(a, k, f"alpha{a:g}-k{k}") for a in alphas for k in ks]
    else:
        grid = [(base.alpha, k, f"k{k}") for k in ks]
    rows = []
    for alpha, k, name in grid:
        config = base.with_changes(k=k, alpha=alpha)
        run = train_and_evaluate(config, data, Path(out_dir) / name, callbacks)
        if run.stopped:
            return None
        device = resolve_device(config.device)
        model, _ = load_model(run.checkpoint, device)
        x = binarized_test_images(data.test_images[:snr_batch]).to(device)
        generator = torch.Generator(device).manual_seed(config.seed)
        snr = gradient_snr(model, x, config, draws=snr_draws, generator=generator)
        metrics = run.metrics or {}
        rows.append(
            StudyRow(
                k=k,
                objective=config.objective,
                test_loglik=metrics.get("test_loglik"),
                test_loglik_std_error=metrics.get("test_loglik_std_error"),
                active_units=metrics.get("active_units"),
                train_seconds=metrics["train_seconds"],
                snr_encoder=snr.encoder.median,
                snr_decoder=snr.decoder.median,
                alpha=config.alpha,
                imputation=metrics.get("imputation"),
            )
        )
    return rows
