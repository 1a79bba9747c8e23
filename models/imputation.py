"""Filling in missing pixels with a trained model (Mattei & Frellsen, "MIWAE: Deep generative
modelling and imputation of incomplete data sets", ICML 2019, arXiv:1812.02633, Sec. 4).

For an image with observed pixels x_o and missing ones x_m, draw z_1..z_K ~ q(z | x_o) (the
encoder sees x with x_m set to zero) and weigh each draw by

    r_k = p(x_o | z_k) p(z_k) / q(z_k | x_o),    w_k = r_k / (r_1 + ... + r_K),

the self-normalised importance weights of p(z | x_o). Then

- single imputation: E[x_m | x_o] = E_{p(z|x_o)} E[x_m | z] ~= sum_k w_k E[x_m | z_k], the
  Bernoulli means of p(x_m | z_k) averaged with the weights (consistent as K grows);
- multiple imputation by sampling importance resampling: pick k with probability w_k, then
  draw x_m ~ p(x_m | z_k); repeated n times it gives n draws that approach p(x_m | x_o).

Observed pixels are kept as they are in every output. A model trained on complete data works
too (its encoder just never saw zeroed pixels); one trained with missing pixels
(`TrainConfig.missing_rate`) should propose better z. `imputation_metrics` scores both on
held-out digits against mean and zero imputation. Shapes: B images, K draws, D pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from models.missing import EVAL_PATTERN, eval_observed
from models.networks import IWAEModel
from models.progress import Callback, PhaseClock, notify

# Probabilities are clipped to [EPS, 1 - EPS] in the cross-entropy, so that a hard 0/1 guess
# (zero imputation) costs log(1/EPS) = 6.9 nats per wrong pixel instead of infinity.
EPS = 1e-3
# Elements of the [K, B, D] tensors of one metric batch; bounds memory for any K.
_CHUNK_ELEMENTS = 1 << 23


@dataclass
class Imputation:
    """What `impute` returns; observed pixels equal the input's everywhere.

    `single`: [B, D], E[x_m | x_o] at missing pixels, in [0, 1]. `draws`: [n, B, D], binary
    draws of x_m from p(x_m | x_o) by resampling. `log_px_observed`: [B], the K-sample IWAE
    bound on log p(x_o) in nats.
    """

    single: Tensor
    draws: Tensor
    log_px_observed: Tensor


@torch.inference_mode()
def impute(
    model: IWAEModel,
    x: Tensor,
    observed: Tensor,
    k: int,
    n: int = 0,
    generator: torch.Generator | None = None,
    *,
    chunk_size: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> Imputation:
    """Single and `n` multiple imputations of x [B, D] (binary) where `observed` [B, D] is 0.

    The K draws come in chunks of `chunk_size` (default: as many as `_CHUNK_ELEMENTS`
    allows), so memory stays at one chunk whatever K. Across chunks the single imputation is
    a running weighted mean over a streaming logsumexp, and each of the n draws keeps one
    candidate, which a later chunk replaces with probability equal to that chunk's share of
    the weight so far (weighted reservoir sampling): exactly sampling importance resampling
    over all K. `on_chunk(samples_done)` runs after every chunk but the last and may raise to
    stop (a caller's deadline).
    """
    batch, dim = x.shape
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // (batch * dim))
    lse = x.new_full((batch,), -math.inf)  # log sum_k r_k so far
    mean = x.new_zeros(batch, dim)  # sum_k w_k E[x | z_k] so far, w normalised so far
    chosen = x.new_zeros(n, batch, dim)  # each draw's candidate E[x | z_k]
    for start in range(0, k, chunk):
        size = min(chunk, k - start)
        log_w, logits = model.log_weights_and_logits(x, size, generator, observed=observed)
        weights = torch.softmax(log_w, 0)  # [c, B], self-normalised within the chunk
        probs = torch.sigmoid(logits)  # [c, B, D], E[x | z_k]
        total = torch.logaddexp(lse, torch.logsumexp(log_w, 0))  # [B]
        share = torch.exp(torch.logsumexp(log_w, 0) - total)  # [B], this chunk's weight share
        mean = (
            mean * (1.0 - share)[:, None]
            + torch.einsum("kb,kbd->bd", weights, probs) * (share[:, None])
        )
        if n > 0:  # SIR: a candidate per draw from this chunk, kept with probability share
            picks = torch.multinomial(weights.T, n, replacement=True, generator=generator)
            candidates = probs[picks.T, torch.arange(batch, device=x.device)]  # [n, B, D]
            taken = torch.rand(n, batch, generator=generator, device=x.device) < share  # [n, B]
            chosen = torch.where(taken[..., None], candidates, chosen)
        lse = total
        if on_chunk is not None and start + size < k:
            on_chunk(start + size)
    keep = observed.bool()
    draws = x.new_empty(0, *x.shape)
    if n > 0:
        draws = torch.where(keep, x, torch.bernoulli(chosen, generator=generator))
    return Imputation(
        single=torch.where(keep, x, mean),
        draws=draws,
        log_px_observed=lse - math.log(k),
    )


def _score(probs: Tensor, x: Tensor, missing: Tensor) -> dict[str, float]:
    """Accuracy (p >= 0.5 against x) and mean binary cross-entropy in nats over the missing
    pixels: probs, x, missing [N, D]."""
    count = missing.sum()
    p = probs.clamp(EPS, 1.0 - EPS)
    bce = -(x * torch.log(p) + (1.0 - x) * torch.log1p(-p))
    correct = ((p >= 0.5).to(x.dtype) == x).to(x.dtype)
    return {
        "accuracy": float((correct * missing).sum() / count),
        "bce": float((bce * missing).sum() / count),
    }


def imputation_metrics(
    model: IWAEModel,
    x: Tensor,
    pixel_mean: Tensor,
    ks: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict | None:
    """Single-imputation quality on binary held-out images x [N, D], top half missing.

    The mask is fixed (`models.missing.EVAL_PATTERN`), so models trained with or without
    missing pixels are compared on the same task. Scored: the model's single imputation for
    each K in `ks`, and two baselines on the same pixels, mean imputation (`pixel_mean` [D],
    each pixel's mean over the training images) and zero imputation (every missing pixel
    black, what the encoder sees). Each gets its accuracy (p >= 0.5 against the pixel) and
    binary cross-entropy (nats per missing pixel) over the missing pixels. `callbacks` see an
    "impute" `Progress` (images imputed, over all of `ks`) after each batch of images; when one
    returns True the scoring stops, and then the result is None.
    """
    observed = eval_observed(*x.shape, device=x.device, dtype=x.dtype)  # [N, D]
    missing = 1.0 - observed
    total = len(ks) * len(x)
    done = 0
    scores = {}
    clock = PhaseClock("impute")
    for k in ks:
        batch = max(1, _CHUNK_ELEMENTS // (k * x.shape[1]))
        singles = []
        for start in range(0, len(x), batch):
            part = slice(start, start + batch)
            singles.append(impute(model, x[part], observed[part], k, 0, generator).single)
            done += len(singles[-1])
            if notify(callbacks, clock.event(done, total)):
                return None
        scores[str(k)] = _score(torch.cat(singles), x, missing)
    return {
        "pattern": EVAL_PATTERN,
        "images": len(x),
        "missing_pixels": int(missing.sum()),
        "zero": _score(torch.zeros_like(x), x, missing),
        "mean": _score(pixel_mean.expand_as(x), x, missing),
        "model": scores,
    }
