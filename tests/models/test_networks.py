"""Tests for models.networks: shapes, dtypes, the log-weights, seeding, the stop-gradient
option, and Burda's architectures."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.distributions import Bernoulli, Normal

from models.config import ModelConfig
from models.networks import IWAEModel, burda_init


def test_float64_model_computes_in_float64(model64: IWAEModel, x_binary: torch.Tensor) -> None:
    """A model converted with .double() must run, and keep float64, on every path."""
    log_w = model64.log_weights(x_binary, 3, torch.Generator().manual_seed(0))  # [K, B]
    assert log_w.dtype == torch.float64
    assert model64.reconstruct(x_binary).dtype == torch.float64
    assert model64.sample(2, torch.Generator().manual_seed(0)).dtype == torch.float64
    means = model64.posterior_means(x_binary, k=3, generator=torch.Generator().manual_seed(0))
    assert all(m.dtype == torch.float64 for m in means)


def test_shapes_and_ranges(model64: IWAEModel, x_binary: torch.Tensor) -> None:
    config = model64.config

    log_w = model64.log_weights(x_binary, 5, torch.Generator().manual_seed(0))
    samples = model64.sample(7, torch.Generator().manual_seed(0))
    recon = model64.reconstruct(x_binary)
    means = model64.posterior_means(x_binary, k=3, generator=torch.Generator().manual_seed(0))

    assert log_w.shape == (5, 4)
    assert torch.isfinite(log_w).all()
    assert samples.shape == (7, 6)
    assert recon.shape == (4, 6)
    for probabilities in (samples, recon):
        assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert [tuple(m.shape) for m in means] == [(4, d) for d in config.latent_dims]
    assert len(model64.encoders) == len(model64.decoders) == config.layers


def test_first_posterior_mean_is_the_encoder_mean(
    model64: IWAEModel, x_binary: torch.Tensor
) -> None:
    mu, _ = model64.encoders[0](x_binary)

    means = model64.posterior_means(x_binary, k=2, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(means[0], mu, rtol=0, atol=0)


def test_log_weights_are_log_joint_minus_log_q_for_one_layer(x_binary: torch.Tensor) -> None:
    """Recompute log w for the one-layer model from the same noise, with torch.distributions."""
    model = IWAEModel(ModelConfig(layers=1, latent_dim=2, hidden_dim=8, x_dim=6)).double()

    log_w = model.log_weights(x_binary, 3, torch.Generator().manual_seed(4))

    mu, logvar = model.encoders[0].net(x_binary).chunk(2, dim=-1)  # [B, d] each
    eps = torch.randn((3, 4, 2), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    z = mu + torch.exp(0.5 * logvar) * eps  # [K, B, d]
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = Bernoulli(logits=model.decoders[0](z)).log_prob(x_binary.expand(3, 4, 6)).sum(-1)
    torch.testing.assert_close(log_w, log_prior + log_lik - log_q, rtol=0, atol=1e-10)


def test_stop_q_params_keeps_the_value_and_changes_only_the_encoder_gradient(
    model64: IWAEModel, x_binary: torch.Tensor
) -> None:
    def grads(stop: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        model64.zero_grad(set_to_none=True)
        log_w = model64.log_weights(
            x_binary, 4, torch.Generator().manual_seed(9), stop_q_params=stop
        )
        log_w.sum().backward()
        encoder = [p.grad.clone() for p in model64.encoder_parameters()]
        decoder = [p.grad.clone() for p in model64.decoder_parameters()]
        return log_w.detach(), encoder, decoder

    log_w, encoder, decoder = grads(stop=False)
    log_w_stopped, encoder_stopped, decoder_stopped = grads(stop=True)

    assert torch.equal(log_w, log_w_stopped)
    for g, g_stopped in zip(decoder, decoder_stopped, strict=True):
        torch.testing.assert_close(g, g_stopped, rtol=0, atol=1e-12)
    # The encoder loses the score term d log q / d phi at fixed z, which is not zero per draw.
    difference = sum((g - s).abs().sum() for g, s in zip(encoder, encoder_stopped, strict=True))
    assert difference > 1e-3
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in encoder_stopped)


def test_seeded_generators_reproduce_exactly(model64: IWAEModel, x_binary: torch.Tensor) -> None:
    def draw(seed: int) -> list[torch.Tensor]:
        return [
            model64.log_weights(x_binary, 3, torch.Generator().manual_seed(seed)),
            model64.sample(5, torch.Generator().manual_seed(seed)),
            *model64.posterior_means(x_binary, k=3, generator=torch.Generator().manual_seed(seed)),
        ]

    first, again, other = draw(1), draw(1), draw(2)

    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[1], other[1])


def test_log_weights_under_bf16_autocast_come_back_in_fp32(x_binary: torch.Tensor) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = IWAEModel(ModelConfig(layers=2, latent_dim=2, hidden_dim=8, x_dim=6))
    x = x_binary.float()

    exact = model.log_weights(x, 3, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.log_weights(x, 3, torch.Generator().manual_seed(0))

    assert mixed.dtype == torch.float32
    # bf16 keeps ~3 significant digits in the matrix products; the weights stay close.
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.2)


def n_params(params: Iterator[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def test_full_size_architectures_have_burdas_layer_sizes() -> None:
    """Parameter counts worked out from the layer sizes (weights + biases of each Linear)."""
    one = IWAEModel(ModelConfig())
    # q: 784-200-200-(50 mean + 50 log-variance); p: 50-200-200-784.
    assert n_params(one.encoder_parameters()) == (784 * 200 + 200) + (200 * 200 + 200) + (
        200 * 100 + 100
    )
    assert n_params(one.decoder_parameters()) == (50 * 200 + 200) + (200 * 200 + 200) + (
        200 * 784 + 784
    )

    two = IWAEModel(ModelConfig(layers=2))
    # q(z1|x): 784-100-100-(2*100); q(z2|z1): 100-50-50-(2*50).
    q1 = (784 * 100 + 100) + (100 * 100 + 100) + (100 * 200 + 200)
    q2 = (100 * 50 + 50) + (50 * 50 + 50) + (50 * 100 + 100)
    # p(z1|z2): 50-50-50-(2*100); p(x|z1): 100-100-100-784.
    p1 = (50 * 50 + 50) + (50 * 50 + 50) + (50 * 200 + 200)
    px = (100 * 100 + 100) + (100 * 100 + 100) + (100 * 784 + 784)
    assert n_params(two.encoder_parameters()) == q1 + q2
    assert n_params(two.decoder_parameters()) == p1 + px
    assert n_params(two.parameters()) == q1 + q2 + p1 + px

    # The authors' code (yburda/iwae experiments.py): q 784-200-200-100 then 100-100-100-50,
    # p 50-100-100-100 then 100-200-200-784.
    code = IWAEModel(ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100))
    q1 = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 200 + 200)
    q2 = (100 * 100 + 100) + (100 * 100 + 100) + (100 * 100 + 100)
    p1 = (50 * 100 + 100) + (100 * 100 + 100) + (100 * 200 + 200)
    px = (100 * 200 + 200) + (200 * 200 + 200) + (200 * 784 + 784)
    assert n_params(code.encoder_parameters()) == q1 + q2
    assert n_params(code.decoder_parameters()) == p1 + px


def test_two_layer_log_weights_recomputed_with_torch_distributions(x_binary: torch.Tensor) -> None:
    """log w = log p(z2) + log p(z1|z2) + log p(x|z1) - log q(z1|x) - log q(z2|z1), each
    term from torch.distributions, for the noise the model draws (eps1 then eps2)."""
    config = ModelConfig(layers=2, latent_dim=2, hidden_dim=5, z1_dim=3, hidden2_dim=4, x_dim=6)
    torch.manual_seed(0)
    model = IWAEModel(config).double()
    k, b = 3, len(x_binary)

    log_w = model.log_weights(x_binary, k, torch.Generator().manual_seed(4))
    log_w_stopped = model.log_weights(
        x_binary, k, torch.Generator().manual_seed(4), stop_q_params=True
    )

    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        mu1, logvar1 = model.encoders[0].net(x_binary).chunk(2, dim=-1)  # [B, 3]
        q1 = Normal(mu1, torch.exp(0.5 * logvar1))
        z1 = q1.loc + q1.scale * torch.randn((k, b, 3), generator=generator, dtype=torch.float64)
        mu2, logvar2 = model.encoders[1].net(z1).chunk(2, dim=-1)  # [K, B, 2]
        q2 = Normal(mu2, torch.exp(0.5 * logvar2))
        z2 = q2.loc + q2.scale * torch.randn((k, b, 2), generator=generator, dtype=torch.float64)
        p_mu1, p_logvar1 = model.decoders[1].net(z2).chunk(2, dim=-1)  # [K, B, 3]
        log_p = (
            Normal(0.0, 1.0).log_prob(z2).sum(-1)
            + Normal(p_mu1, torch.exp(0.5 * p_logvar1)).log_prob(z1).sum(-1)
            + Bernoulli(logits=model.decoders[0](z1)).log_prob(x_binary.expand(k, b, 6)).sum(-1)
        )
        expected = log_p - q1.log_prob(z1).sum(-1) - q2.log_prob(z2).sum(-1)  # [K, B]

    torch.testing.assert_close(log_w, expected, rtol=0, atol=1e-10)
    assert torch.equal(log_w, log_w_stopped)


def test_log_weights_stay_finite_with_a_nearly_deterministic_encoder(
    x_binary: torch.Tensor,
) -> None:
    """An encoder log-variance of -100 (sigma = 2e-22): in fp32, exp(100) overflowed and
    (z - mu)^2 * exp(-logvar) gave 0 * inf = NaN; read off the noise, log q is exact.
    The reference, in float64: z = mu to every digit, log q from the same noise."""
    torch.manual_seed(0)
    model = IWAEModel(ModelConfig(layers=1, latent_dim=2, hidden_dim=8, x_dim=6))
    with torch.no_grad():
        head = model.encoders[0].net[-1]
        head.weight[2:] = 0.0
        head.bias[2:] = -100.0  # logvar of both latent units
    x = x_binary.float()
    eps = torch.randn((3, 4, 2), generator=torch.Generator().manual_seed(1)).double()
    reference = model.double()
    with torch.no_grad():
        mu, logvar = reference.encoders[0](x.double())  # [B, 2] each
        log_q = Normal(0.0, 1.0).log_prob(eps).sum(-1) - 0.5 * logvar.sum(-1)  # [K, B]
        logits = reference.decoders[0](mu)  # [B, D]
        log_p = Normal(0.0, 1.0).log_prob(mu).sum(-1) + Bernoulli(logits=logits).log_prob(
            x.double()
        ).sum(-1)
    model.float()

    for stop in (False, True):
        log_w = model.log_weights(x, 3, torch.Generator().manual_seed(1), stop_q_params=stop)

        assert torch.isfinite(log_w).all()
        torch.testing.assert_close(log_w.double(), log_p - log_q, rtol=1e-5, atol=1e-4)


def test_burda_init_follows_the_authors_code() -> None:
    """Glorot-uniform weights (bound sqrt(6 / (fan_in + fan_out)); the mean and log-variance
    halves of a Gaussian head drawn as two layers, the latter doubled), zero biases, and the
    output bias at logit(clip(mean pixel, 0.001, 0.999))."""
    torch.manual_seed(0)
    model = IWAEModel(ModelConfig(layers=2, latent_dim=20, hidden_dim=300, x_dim=6))
    pixel_mean = torch.tensor([0.0, 0.0005, 0.25, 0.5, 0.9, 1.0])

    burda_init(model, pixel_mean)

    output_bias = model.decoders[0][-1].bias
    p = torch.tensor([0.001, 0.001, 0.25, 0.5, 0.9, 0.999])
    torch.testing.assert_close(output_bias, torch.log(p / (1 - p)))
    for name, param in model.named_parameters():
        if name.endswith("bias") and param is not output_bias:
            assert (param == 0).all(), name
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        heads = [module.weight]
        if name.endswith("net.4"):  # the last layer of a GaussianLayer
            heads = list(module.weight.chunk(2, dim=0))  # mean, logvar
        for i, w in enumerate(heads):
            fan_out, fan_in = w.shape
            bound = (6 / (fan_in + fan_out)) ** 0.5 * (2 if i == 1 else 1)
            assert w.abs().max() <= bound, name
            # Uniform on [-bound, bound]: the largest |w| of hundreds is close to the bound.
            assert w.abs().max() > 0.9 * bound, name
