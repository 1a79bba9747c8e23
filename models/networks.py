"""Burda et al.'s MNIST VAE/IWAE networks with one or two stochastic layers.

Inference path q(z_1|x) q(z_2|z_1) ...; generative path p(z_L) p(z_{L-1}|z_L) ... p(x|z_1).
Every conditional is a two-hidden-layer tanh MLP; latent conditionals are diagonal Gaussians
parameterised by mean and log-variance, p(x|z_1) is a Bernoulli with logits.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call

from models.config import ModelConfig
from models.distributions import (
    bernoulli_log_prob,
    gaussian_log_prob,
    gaussian_log_prob_at_noise,
    gaussian_log_prob_of_noise,
    standard_normal_log_prob,
)


def _upcast(t: Tensor) -> Tensor:
    """Half-precision outputs of autocast back to fp32; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, d_out),
    )


class GaussianLayer(nn.Module):
    """h [..., d_in] -> (mu, logvar), each [..., d_out], computed in fp32 under autocast."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.net = _mlp(d_in, hidden, 2 * d_out)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = _upcast(self.net(h)).chunk(2, dim=-1)
        return mu, logvar


def burda_init(model: IWAEModel, pixel_mean: Tensor | None = None) -> IWAEModel:
    """Initialise `model` in place as Burda et al.'s code did (yburda/iwae `nnet.py`, `iwae.py`).

    Weights uniform in +-sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio, 2010, eq. 16), biases
    zero, and the bias of p(x|z_1)'s output set to the logit of the training set's mean grey
    level per pixel `pixel_mean` [D], clipped to [0.001, 0.999] as there. The authors'
    Gaussian layers have separate mean and log-sigma heads of d outputs each; ours output
    (mu, logvar) from one linear layer, so each half is drawn with fan_out = d and the
    log-variance half is doubled (logvar = 2 log sigma). Draws from the global RNG.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                module.bias.zero_()
        for layer in model.modules():
            if isinstance(layer, GaussianLayer):
                head = layer.net[-1]
                mean_w, logvar_w = head.weight.chunk(2, dim=0)  # views, [d, h] each
                nn.init.xavier_uniform_(mean_w)
                nn.init.xavier_uniform_(logvar_w).mul_(2.0)
        if pixel_mean is not None:
            p = pixel_mean.clamp(0.001, 0.999).to(model.decoders[0][-1].bias)
            model.decoders[0][-1].bias.copy_(torch.log(p) - torch.log1p(-p))
    return model


class IWAEModel(nn.Module):
    """The generative model p(x, z) and its inference network q(z|x).

    `encoders[i]` is q(z_{i+1} | z_i) with z_0 = x; `decoders[0]` gives the logits of
    p(x | z_1) and `decoders[i]` (i >= 1) the Gaussian p(z_i | z_{i+1}).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths = (config.x_dim, *config.latent_dims)
        hidden = config.hidden_dims  # block i's deterministic width
        self.encoders = nn.ModuleList(
            GaussianLayer(widths[i], hidden[i], widths[i + 1]) for i in range(config.layers)
        )
        self.decoders = nn.ModuleList(
            [_mlp(widths[1], hidden[0], widths[0])]
            + [GaussianLayer(widths[i + 1], hidden[i], widths[i]) for i in range(1, config.layers)]
        )

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoders.parameters()

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        return self.decoders.parameters()

    def log_weights(
        self,
        x: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        *,
        stop_q_params: bool = False,
        observed: Tensor | None = None,
    ) -> Tensor:
        """log w = log p(x, z) - log q(z|x) for K reparameterised draws z ~ q(z|x).

        x: [B, D] -> log_w: [K, B]. With `stop_q_params`, log q is evaluated with the
        inference network's parameters detached while z keeps its reparameterisation
        gradient: the path-derivative form that STL and DReG need. With `observed` ([B, D],
        1 = observed), the encoder sees x with missing pixels set to zero and p(x|z) counts
        observed pixels only: log w = log p(x_obs, z) - log q(z|x_obs) (Mattei & Frellsen,
        2019, Sec. 3). With or without `stop_q_params`, log q is read off the standard-normal
        noise that drew z, so both forms give the same values.
        """
        return self.log_weights_and_logits(
            x, k, generator, stop_q_params=stop_q_params, observed=observed
        )[0]

    def log_weights_and_logits(
        self,
        x: Tensor,
        k: int,
        generator: torch.Generator | None = None,
        *,
        stop_q_params: bool = False,
        observed: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """`log_weights` and the Bernoulli logits of p(x|z_1) of each draw: ([K, B], [K, B, D])."""
        if observed is not None:
            x = x * observed  # the encoder's input: missing pixels set to zero
        log_q = x.new_zeros(())
        h = x
        zs = []
        for i, encoder in enumerate(self.encoders):
            mu, logvar = encoder(h)  # [B, d] for i == 0, else [K, B, d]
            shape = (k, *mu.shape) if i == 0 else mu.shape
            eps = torch.randn(shape, generator=generator, device=x.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps  # [K, B, d]
            if stop_q_params:
                mu, logvar = self._detached_params(i, encoder, h, mu, logvar)
                log_q = log_q + gaussian_log_prob_at_noise(z, mu, logvar, eps)  # [K, B]
            else:
                log_q = log_q + gaussian_log_prob_of_noise(eps, logvar)  # [K, B]
            zs.append(z)
            h = z
        log_p, logits = self._log_joint(x, zs, observed)
        return log_p - log_q, logits

    @staticmethod
    def _detached_params(
        i: int, encoder: GaussianLayer, h: Tensor, mu: Tensor, logvar: Tensor
    ) -> tuple[Tensor, Tensor]:
        if i == 0:  # q(z_1|x): x carries no gradient, so detaching the outputs suffices
            return mu.detach(), logvar.detach()
        # q(z_{i+1}|z_i): keep the gradient through z_i, stop it through the weights.
        frozen = {name: p.detach() for name, p in encoder.named_parameters()}
        return functional_call(encoder, frozen, (h,))

    def _log_joint(
        self, x: Tensor, zs: list[Tensor], observed: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """log p(x_obs, z_1..z_L) and the logits of p(x|z_1): x [B, D], zs[i] [K, B, d_i]
        -> ([K, B], [K, B, D])."""
        log_p = standard_normal_log_prob(zs[-1])
        for i in range(1, len(zs)):
            mu, logvar = self.decoders[i](zs[i])
            log_p = log_p + gaussian_log_prob(zs[i - 1], mu, logvar)
        logits = _upcast(self.decoders[0](zs[0]))  # [K, B, D]
        return log_p + bernoulli_log_prob(x, logits, observed), logits

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Bernoulli means of p(x|z_1) for z drawn from the prior: [n, D] in [0, 1]."""
        weight = next(self.parameters())
        z = torch.randn(
            n,
            self.config.latent_dims[-1],
            generator=generator,
            device=weight.device,
            dtype=weight.dtype,
        )
        for decoder in reversed(self.decoders[1:]):
            mu, logvar = decoder(z)
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + torch.exp(0.5 * logvar) * eps
        return torch.sigmoid(_upcast(self.decoders[0](z)))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Bernoulli means of p(x | z_1 = E_q[z_1|x]): [B, D] -> [B, D] in [0, 1]."""
        mu, _ = self.encoders[0](x)
        return torch.sigmoid(_upcast(self.decoders[0](mu)))

    def posterior_means(
        self, x: Tensor, k: int = 100, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """E_q[z_i | x] for each stochastic layer: x [B, D] -> [[B, d_i], ...].

        Exact for the first layer; higher layers average their conditional means over K
        draws of the layer below (they have no closed form).
        """
        mu, logvar = self.encoders[0](x)
        means = [mu]
        z = mu + torch.exp(0.5 * logvar) * torch.randn(
            (k, *mu.shape), generator=generator, device=x.device, dtype=mu.dtype
        )  # [K, B, d_1]
        for encoder in self.encoders[1:]:
            mu, logvar = encoder(z)  # [K, B, d_i]
            means.append(mu.mean(0))
            z = mu + torch.exp(0.5 * logvar) * torch.randn(
                mu.shape, generator=generator, device=x.device, dtype=mu.dtype
            )
        return means
