"""What the API computes with a served model: samples, reconstructions, log-likelihoods,
imputations.

Called through `app.backpressure.InferenceGate`, in its threads and never on the event loop;
every call runs under `torch.inference_mode()`. Inputs and outputs are numpy arrays on the CPU,
whatever device the model lives on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from app.registry import ServedModel
from models.estimators import log_likelihood
from models.imputation import impute as impute_missing
from models.progress import Callback

D = 784


@dataclass(frozen=True)
class Score:
    """Per-image estimates in nats; `bits_per_dim = -log_likelihood / (784 ln 2)`.

    `ess` is the effective sample size of the K weights; `pareto_k` their PSIS k-hat, None
    when K <= 20 (see `models.estimators.LogLikelihood`).
    """

    log_likelihood: float
    std_error: float
    elbo: float
    ess: float
    pareto_k: float | None

    @property
    def bits_per_dim(self) -> float:
        return -self.log_likelihood / (D * math.log(2.0))


def _generator(served: ServedModel, seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=served.device).manual_seed(seed)


def _row(served: ServedModel, values: np.ndarray) -> torch.Tensor:
    """One image's `[784]` values as a batch of one on the model's device: `[1, 784]` float32."""
    return torch.as_tensor(values, dtype=torch.float32, device=served.device).view(1, D)


# Digits drawn at once by `sample`: between two such chunks, its caller's deadline is checked.
SAMPLE_CHUNK = 128


def sample(
    served: ServedModel,
    n: int,
    seed: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> np.ndarray:
    """n digits from the model: Bernoulli means `[n, 784]` in [0, 1]; same seed, same digits.

    Drawn SAMPLE_CHUNK at a time; `on_chunk(done)` runs between chunks and may raise to stop.
    """
    generator = _generator(served, seed)
    chunks = []
    with torch.inference_mode():
        for start in range(0, n, SAMPLE_CHUNK):
            if on_chunk is not None and start > 0:
                on_chunk(start)
            size = min(SAMPLE_CHUNK, n - start)
            chunks.append(served.model.sample(size, generator).float().cpu())  # [c, D]
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, D), dtype=np.float32)


def reconstruct(served: ServedModel, digit: np.ndarray) -> np.ndarray:
    """One digit `[784]` -> its reconstruction `[784]` in [0, 1]."""
    with torch.inference_mode():
        x = _row(served, digit)  # [1, D]
        return served.model.reconstruct(x)[0].float().cpu().numpy()  # [D]


def score(
    served: ServedModel,
    digit: np.ndarray,
    k: int,
    *,
    chunk_size: int | None = None,
    seed: int | None = None,
    on_chunk: Callback | None = None,
) -> Score:
    """K-sample importance-weighted estimate of log p(x) for one binarized digit `[784]`.

    `on_chunk` sees a "loglik" `Progress` between chunks of samples and may raise to stop
    (deadline, disconnect).
    """
    with torch.inference_mode():
        x = _row(served, digit)  # [1, D]
        result = log_likelihood(
            served.model,
            x,
            k,
            generator=_generator(served, seed),
            chunk_size=chunk_size,
            callbacks=() if on_chunk is None else (on_chunk,),
        )  # fields [1]
        return Score(
            log_likelihood=float(result.log_px[0]),
            std_error=float(result.std_error[0]),
            elbo=float(result.elbo[0]),
            ess=float(result.ess[0]),
            pareto_k=None if result.pareto_k[0].isnan() else float(result.pareto_k[0]),
        )


@dataclass(frozen=True)
class Imputed:
    """`single [784]`: observed pixels as given, E[x_missing | x_observed] elsewhere;
    `draws [n, 784]`: binary draws of the missing pixels; `observed_log_likelihood`: the
    K-sample IWAE bound on log p(x_observed), nats."""

    single: np.ndarray
    draws: np.ndarray
    observed_log_likelihood: float


def impute(
    served: ServedModel,
    digit: np.ndarray,
    missing: np.ndarray,
    k: int,
    n: int,
    seed: int | None = None,
    *,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Imputed:
    """Fill in the `missing [784]` pixels of one binarized digit `[784]` with K importance
    samples: the single imputation and n draws by sampling importance resampling.

    `on_chunk` runs between chunks of `chunk_size` samples and may raise to stop."""
    with torch.inference_mode():
        x = _row(served, digit)  # [1, D]
        observed = _row(served, ~missing)  # [1, D], 1 where observed
        result = impute_missing(
            served.model,
            x,
            observed,
            k,
            n,
            _generator(served, seed),
            chunk_size=chunk_size,
            on_chunk=on_chunk,
        )
        return Imputed(
            single=result.single[0].float().cpu().numpy(),
            draws=result.draws[:, 0].float().cpu().numpy(),
            observed_log_likelihood=float(result.log_px_observed[0]),
        )
