"""A trainable linear-Gaussian model whose exact posterior a diagonal q can represent.

p(z) = N(0, I_d), p(x|z) = N(W z + b, s^2 I_D) with d=2, D=3 and orthogonal columns of W, so
the posterior N(A x + c, S) has a diagonal covariance S = (I + W^T W / s^2)^-1, with
A = S W^T / s^2 and c = -A b. The encoder q(z|x) = N(A' x + c', diag(exp(logvar'))) has
parameters (A', c', logvar') and the decoder (W, b): the objectives and gradient estimators
of `models.objectives` run on it as on `IWAEModel`, with log q computed by the same
`models.distributions` functions, so tests can compare them with closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from models.distributions import (
    gaussian_log_prob,
    gaussian_log_prob_at_noise,
    gaussian_log_prob_of_noise,
    standard_normal_log_prob,
)

F64 = torch.float64
S = 0.7


class LinearGaussianModel(nn.Module):
    """q starts at the exact posterior, moved by `shift` (mean) and `log_scale` (log sd)."""

    def __init__(self, shift: float = 0.0, log_scale: float = 0.0) -> None:
        super().__init__()
        # Orthogonal columns: W^T W = diag(3.17, 3.25) (W's columns [1, 0.3, -1.2] and
        # [0.6, 1.4, 0.85] have a zero dot product).
        self.W = nn.Parameter(torch.tensor([[1.0, 0.6], [0.3, 1.4], [-1.2, 0.85]], dtype=F64))
        self.b = nn.Parameter(torch.tensor([0.2, -0.4, 1.0], dtype=F64))
        posterior_var = 1.0 / (1.0 + (self.W.detach() ** 2).sum(0) / S**2)  # [d]
        a = posterior_var[:, None] * self.W.detach().T / S**2  # [d, D]
        self.A = nn.Parameter(a.clone())
        self.c = nn.Parameter(-(a @ self.b.detach()) + shift)
        self.logvar = nn.Parameter(posterior_var.log() + 2.0 * log_scale)

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return iter([self.A, self.c, self.logvar])

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        return iter([self.W, self.b])

    def log_px(self, x: Tensor) -> Tensor:
        """The closed form: [B, D] -> [B]."""
        cov = self.W @ self.W.T + S**2 * torch.eye(3, dtype=F64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def log_weights(
        self,
        x: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        *,
        stop_q_params: bool = False,
        observed: Tensor | None = None,
    ) -> Tensor:
        """x [B, D] -> log w [K, B], with `IWAEModel.log_weights`'s meaning of stop_q_params;
        every pixel is observed (`observed` must be None)."""
        assert observed is None, "the linear-Gaussian model has no missing pixels"
        mu = x @ self.A.T + self.c  # [B, d]
        logvar = self.logvar.expand_as(mu)
        eps = torch.randn((k, *mu.shape), generator=generator, dtype=F64)  # [K, B, d]
        z = mu + torch.exp(0.5 * logvar) * eps  # [K, B, d]
        if stop_q_params:
            log_q = gaussian_log_prob_at_noise(z, mu.detach(), logvar.detach(), eps)
        else:
            log_q = gaussian_log_prob_of_noise(eps, logvar)
        log_lik = gaussian_log_prob(x, z @ self.W.T + self.b, torch.full_like(x, 2.0 * math.log(S)))
        return standard_normal_log_prob(z) + log_lik - log_q  # [K, B]
