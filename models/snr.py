"""Gradient signal-to-noise ratio of the encoder's and the decoder's gradient estimators
(Rainforth et al., 2018, "Tighter variational bounds are not necessarily better")."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from models.config import MIN_SNR_DRAWS, TrainConfig
from models.networks import IWAEModel
from models.objectives import backward, surrogates
from models.progress import Callback, PhaseClock, notify
from models.spread import mean_sd

NETWORKS = ("encoder", "decoder")
SUMMARIES = ("median", "rms", "direction")


@dataclass
class SNRSummary:
    """Signal-to-noise ratios |E[g]| / std[g] of a P-parameter gradient estimator.

    `median`: the median over parameters of each one's bias-corrected SNR; `rms`: the root
    of the mean over parameters of the bias-corrected SNR^2, which resolves smaller SNRs
    than the median because it averages the estimates before clipping them at 0;
    `direction`: the SNR of the whole gradient projected on its mean direction, E[u.g] /
    std[u.g] with u = E[g] / |E[g]|, the signal that a step along the mean sees.
    `parameters` counts the parameters whose gradient varies (the others carry no noise).
    """

    median: float
    rms: float
    direction: float
    parameters: int


class SNRAccumulator:
    """Streams M draws g_1..g_M of a gradient [P] into `SNRSummary` with memory O(P).

    Rainforth et al. (2018) define SNR = |E g| / std g per parameter; its plug-in
    estimate |mean| / sd has a floor: at true SNR 0 it averages sqrt(2 / (pi M)). Here,
    with mean m and unbiased variance v of M draws, for Gaussian draws
    E[m^2 / v] = (SNR^2 + 1/M) (M - 1) / (M - 3), so (M - 3) / (M - 1) m^2 / v - 1/M is an
    unbiased estimate of SNR^2; it is clipped at 0 only after averaging (`rms`) or as a
    monotone map under the median. The direction u is estimated from the first half of the
    draws and the projections u.g measured on the second half, so that u's own noise does
    not inflate the signal. Where the per-parameter SNRs are below ~1/sqrt(M/2), u itself is
    noisy and `direction` is the SNR along that perturbed direction (lower, for isotropic
    noise, than along the true mean).
    """

    def __init__(self, draws: int) -> None:
        if draws < MIN_SNR_DRAWS:
            raise ValueError(f"the SNR needs at least {MIN_SNR_DRAWS} draws")
        self.draws, self.seen = draws, 0
        self._sum: Tensor | None = None  # [P], float64
        self._sum_sq: Tensor | None = None
        self._direction: Tensor | None = None  # unit mean of the first half, [P]
        self._projections: list[Tensor] = []

    def add(self, g: Tensor) -> None:
        """One draw [P]."""
        g = g.detach().double()
        if self._sum is None:
            self._sum, self._sum_sq = torch.zeros_like(g), torch.zeros_like(g)
        if self._direction is not None:
            self._projections.append(self._direction @ g)
        self._sum += g
        self._sum_sq += g.square()
        self.seen += 1
        if self.seen == self.draws // 2:
            norm = self._sum.norm()
            self._direction = self._sum / norm if norm > 0 else torch.zeros_like(g)

    def summary(self) -> SNRSummary:
        if self.seen != self.draws:
            raise ValueError(f"expected {self.draws} draws, got {self.seen}")
        mean = self._sum / self.draws  # [P]
        var = (self._sum_sq - self.draws * mean.square()) / (self.draws - 1)  # [P]
        varying = var > 0
        snr2 = _unbiased_snr2(mean[varying], var[varying], self.draws)  # [P']
        projections = torch.stack(self._projections)  # [M - M/2]
        direction2 = _unbiased_snr2(projections.mean(), projections.var(), len(projections))
        return SNRSummary(
            median=float(snr2.clamp_min(0).sqrt().median()) if len(snr2) else 0.0,
            rms=float(snr2.mean().clamp_min(0).sqrt()) if len(snr2) else 0.0,
            direction=float(direction2.clamp_min(0).sqrt()) if projections.var() > 0 else 0.0,
            parameters=int(varying.sum()),
        )


def _unbiased_snr2(mean: Tensor, var: Tensor, m: int) -> Tensor:
    """Unbiased estimate of SNR^2 from the mean and unbiased variance of m Gaussian draws."""
    return (m - 3) / (m - 1) * mean.square() / var - 1.0 / m


def snr_summary(grads: Tensor) -> SNRSummary:
    """`SNRSummary` of M draws of a P-parameter gradient held in one tensor [M, P]."""
    accumulator = SNRAccumulator(len(grads))
    for g in grads:
        accumulator.add(g)
    return accumulator.summary()


@dataclass
class GradientSNR:
    """The SNR of the encoder's and of the decoder's gradient estimator."""

    encoder: SNRSummary
    decoder: SNRSummary

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_snr(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    *,
    draws: int = 1000,
    generator: torch.Generator | None = None,
    callbacks: Sequence[Callback] = (),
) -> GradientSNR | None:
    """SNR of the gradient estimator of `config.objective` at fixed parameters and data x [B, D].

    Each of the M=`draws` estimates is the gradient of the batch-mean surrogate with fresh
    importance samples for the same x; Rainforth et al. (2018) measure it with B=1.
    `callbacks` see an "snr" `Progress` (gradient draws) after each draw; when one returns
    True the measurement stops, and then the result is None.
    """
    networks = {
        "encoder": list(model.encoder_parameters()),
        "decoder": list(model.decoder_parameters()),
    }
    accumulators = {name: SNRAccumulator(draws) for name in networks}
    clock = PhaseClock("snr")
    for draw in range(draws):
        model.zero_grad(set_to_none=True)
        backward(model, surrogates(model, x, config, generator))
        for name, params in networks.items():
            accumulators[name].add(
                torch.cat([_grad_or_zeros(p).flatten() for p in params])  # [P]
            )
        if notify(callbacks, clock.event(draw + 1, draws)):
            model.zero_grad(set_to_none=True)
            return None
    model.zero_grad(set_to_none=True)
    return GradientSNR(**{name: acc.summary() for name, acc in accumulators.items()})


@dataclass
class SNRSweep:
    """Gradient SNR against K at fixed parameters, one image at a time: Rainforth et al.
    (2018), theorem 1, states it for one x, so each image gets its own log-log slope, and
    the spread of the slopes over images (and, in a study, over seeds) is the uncertainty.

    `per_image[i][j]`: the SNR of image i at `ks[j]` from `draws` gradient draws.
    """

    ks: list[int]
    draws: int
    per_image: list[list[GradientSNR]]

    def image_slopes(self) -> list[dict[str, dict[str, float | None]]]:
        """`snr_slopes` of each image."""
        return [snr_slopes(self.ks, snrs) for snrs in self.per_image]

    def to_dict(self) -> dict:
        """{"ks", "draws", "images", "snr": [per K: each network's summaries averaged over
        images], "image_slopes": [per image], "slopes": {network: {summary: {"mean", "sd",
        "n"} over images}}}."""
        image_slopes = self.image_slopes()
        return {
            "ks": self.ks,
            "draws": self.draws,
            "images": len(self.per_image),
            "snr": [
                {"k": k, **_mean_snr([snrs[j] for snrs in self.per_image]).to_dict()}
                for j, k in enumerate(self.ks)
            ],
            "image_slopes": image_slopes,
            "slopes": {
                network: {
                    summary: mean_sd([s[network][summary] for s in image_slopes])
                    for summary in SUMMARIES
                }
                for network in NETWORKS
            },
        }


def pool_sweeps(sweeps: Sequence[dict]) -> dict:
    """`SNRSweep.to_dict()`s of several models at the same `ks` (the seeds of one objective
    and training K) pooled: per K, each network's summaries {"mean", "sd", "n"} over the
    models' image averages; the slopes {"mean", "sd", "n"} over every image of every model."""
    ks = sweeps[0]["ks"]
    image_slopes = [slopes for sweep in sweeps for slopes in sweep["image_slopes"]]
    return {
        "ks": ks,
        "draws": sweeps[0]["draws"],
        "models": len(sweeps),
        "images": len(image_slopes),
        "snr": {
            network: {
                summary: [
                    mean_sd([sweep["snr"][j][network][summary] for sweep in sweeps])
                    for j in range(len(ks))
                ]
                for summary in SUMMARIES
            }
            for network in NETWORKS
        },
        "slopes": {
            network: {
                summary: mean_sd([s[network][summary] for s in image_slopes])
                for summary in SUMMARIES
            }
            for network in NETWORKS
        },
    }


def snr_sweep(
    model: IWAEModel,
    x: Tensor,
    config: TrainConfig,
    ks: Sequence[int],
    *,
    draws: int = 1000,
    generator: torch.Generator | None = None,
) -> SNRSweep:
    """`gradient_snr` of `config.objective` for each image of x [N, D] alone (B=1) at each
    K of `ks`, the parameters fixed."""
    if len(x) == 0:
        raise ValueError("the SNR needs at least one image")
    per_image = [
        [
            gradient_snr(
                model, x[i : i + 1], config.with_changes(k=k), draws=draws, generator=generator
            )
            for k in ks
        ]
        for i in range(len(x))
    ]
    return SNRSweep(list(ks), draws, per_image)


def _mean_snr(snrs: Sequence[GradientSNR]) -> GradientSNR:
    """Each summary of each network averaged over `snrs`."""

    def mean(network: str) -> SNRSummary:
        summaries = [getattr(s, network) for s in snrs]
        return SNRSummary(
            **{name: statistics.fmean(getattr(s, name) for s in summaries) for name in SUMMARIES},
            parameters=max(s.parameters for s in summaries),
        )

    return GradientSNR(encoder=mean("encoder"), decoder=mean("decoder"))


def snr_slopes(
    ks: Sequence[int], snrs: Sequence[GradientSNR]
) -> dict[str, dict[str, float | None]]:
    """log-log slope of every summary of both networks against K: {"encoder": {"median":
    slope, "rms": ..., "direction": ...}, "decoder": {...}}."""
    return {
        network: {
            summary: loglog_slope(ks, [getattr(getattr(s, network), summary) for s in snrs])
            for summary in SUMMARIES
        }
        for network in NETWORKS
    }


def loglog_slope(ks: Sequence[int], values: Sequence[float]) -> float | None:
    """Least-squares slope of log(value) against log(K) over the positive values; None when
    fewer than two are positive. Rainforth et al. (2018), theorem 1: about -1/2 for IWAE's
    encoder gradient and +1/2 for its decoder's."""
    points = [(math.log(k), math.log(v)) for k, v in zip(ks, values, strict=True) if v > 0]
    if len(points) < 2:
        return None
    xs, ys = torch.tensor(points, dtype=torch.float64).T
    xs = xs - xs.mean()
    if not (xs != 0).any():
        return None
    return float((xs * (ys - ys.mean())).sum() / xs.square().sum())


def _grad_or_zeros(p: Tensor) -> Tensor:
    return p.grad.detach() if p.grad is not None else torch.zeros_like(p)
