"""The fast path: Burda's one-layer model's forward and backward pass written by hand.

`IWAEModel.log_weights` under autograd is the reference. This module computes the same
log-weights with explicit matrix products into buffers allocated once per shape, and no
autograd graph for the networks: the objective's gradient with respect to log w [K, B] comes
from autograd on that small tensor (`models.objectives.surrogates_of`, so every objective
stays written once), and is then carried back through the networks by hand. Two upstream
gradients flow back, one for the encoder's parameters and one for the decoder's, which covers
the objectives whose encoder and decoder follow different estimators (DReG, PIWAE); STL and
DReG's stop-gradient on q's parameters is one more term of the encoder's path.

Covered: the one-layer model (x -[h, h]-> z -[h, h]-> x), every objective, with or without
a missing-pixel mask, in the parameters' dtype (TF32 products too: a setting of cuBLAS, not
of this code). `fast_path` returns None, and the caller uses the reference, for two
stochastic layers and under autocast (bf16).

Notation: rows r = (k, b) of the R = K*B samples, D pixels, H hidden units, d latent units.
Encoder (B rows): h1 = tanh(x W1^T + b1), h2 = tanh(h1 W2^T + b2), [mu, logvar] = h2 W3^T + b3;
z = mu + exp(logvar / 2) eps. Decoder (R rows): g1 = tanh(z V1^T + c1),
g2 = tanh(g1 V2^T + c2), logits l = g2 V3^T + c3. Then

    log w = sum_d o_d (x_d l_d - softplus(l_d)) - |z|^2 / 2 + sum_j (logvar_j + eps_j^2) / 2

(the log 2 pi of p(z) and q(z|x) cancel; o is the mask, all ones without one), where
sum_d o_d x_d l_d = g2 . (V3^T (o x)) + c3 . (o x) needs no pass over the [R, D] logits.
Backward, for an upstream u_r = dL / d log w_r: with e = o x - o sigmoid(l) [R, D]
(= d log p(x|z) / dl, written in the forward over the logits' buffer) and the row sensitivities
a2 = (e V3) (1 - g2^2), a1 = (a2 V2) (1 - g1^2), a0 = a1 V1, every gradient is a row scaling
of them (row scalings commute with products on the right):
dV3 = e^T (u g2), dc3 = e^T u, dV2 = a2^T (u g1), dc2 = a2^T u, dV1 = a1^T (u z), dc1 = a1^T u,
dL/dz = u (a0 - z) (+ u eps exp(-logvar/2) with q's parameters stopped, the STL/DReG path).
So the decoder's backward costs its four big matrix products however many upstreams there are.

Besides the products (`python bench/roofline.py --profile` times each operation against its
floor): each decoder layer's bias rides in its product (a ones column: no pass to add it, none
to sum its gradient); tanh is computed as 2 sigmoid(2a) - 1, PyTorch's CPU sigmoid being ~4x
faster than its tanh; the softplus sum over the [R, D] logits takes one log per 112 pixels
(`_softplus_sums`); inference runs the decoder in blocks whose logits stay in the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from models.config import TrainConfig
from models.distributions import inverse_std
from models.networks import IWAEModel
from models.objectives import sampling_plan, surrogates_of

T = TypeVar("T")
# Rows of one decoder block in inference: its logits and the softplus's scratch, 2 x 2048 x
# 784 fp32 = 12.8 MB, stay in a 32 MB L3 cache between the product that writes the logits
# and the passes that read them (4096 rows measured no faster, whole chunks 20-30% slower).
_BLOCK_ROWS = 2048
# Factors sigmoid(|l|) >= 1/2 multiplied before one log (see `_softplus_sums`).
_FACTORS = 112


def fast_path(model: IWAEModel, config: TrainConfig | None = None) -> FastPath | None:
    """The fast path for `model` (trained with `config`), or None where the reference
    (autograd) path must run: two stochastic layers, bf16 training, or autocast enabled."""
    device = next(model.parameters()).device
    if model.config.layers != 1 or torch.is_autocast_enabled(device.type):
        return None
    if config is not None and config.precision == "bf16":
        return None
    return FastPath(model)


@dataclass
class _Buffers:
    """What one shape (n samples of B images) needs, allocated once and reused.

    z, g1 and g2 carry a last column of ones, so that one matrix product with [V | c] also
    adds the bias, and the weight-gradient product also yields the bias's gradient.
    """

    z: Tensor  # [R, d + 1]
    z_view: Tensor  # [n, B, d], z without its ones column
    g1: Tensor  # [R, H + 1]
    g2: Tensor  # [R, H + 1]
    logits: Tensor  # [R, D]; holds e after a training forward
    scratch: Tensor  # [R, D], for the softplus
    scaled: Tensor  # [R, H + 1]: rows of g times the upstream
    product: Tensor  # [R, H]: a product before its tanh; in the backward, e V3 and a2
    back: Tensor  # [R, H] in training (a1), else empty


@dataclass
class _Forward:
    """What the backward needs of one training forward (besides the buffers)."""

    x_in: Tensor  # [B, D], the encoder's input (missing pixels zero)
    h1: Tensor  # [B, H]
    h2: Tensor  # [B, H]
    std: Tensor  # [B, d], exp(logvar / 2)
    logvar: Tensor  # [B, d]
    eps: Tensor  # [n, B, d]
    buffers: _Buffers


class FastPath:
    """Hand-written passes of a one-layer `IWAEModel`; reads its parameters at every call.

    `set_gradients` replaces `surrogates` + `backward` in a training step; `log_weights`
    replaces `IWAEModel.log_weights` in the log-likelihood estimate. Both draw the same noise
    from the generator as the reference does, so they return the same values up to rounding.
    """

    def __init__(self, model: IWAEModel) -> None:
        if model.config.layers != 1:
            raise ValueError("the fast path covers the one-layer model only")
        self.model = model
        self._encoder = _linears(model.encoders[0].net)
        self._decoder = _linears(model.decoders[0])
        self._buffers: dict[tuple, Any] = {}
        self._grads: dict[nn.Parameter, Tensor] = {}
        # [V | c] of each decoder layer, twice that before a tanh (see `_tanh_of_half`).
        self._weights = [torch.empty(w.shape[0], w.shape[1] + 1).to(w) for w, _ in self._decoder]
        self._weight_grads = [torch.empty_like(w) for w in self._weights]

    @torch.no_grad()
    def log_weights(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log w for K draws per image: x [B, D] -> [K, B], as `IWAEModel.log_weights`."""
        return self._forward(x, k, generator, None, training=False)[0]

    @torch.no_grad()
    def set_gradients(
        self,
        x: Tensor,
        config: TrainConfig,
        generator: torch.Generator | None = None,
        *,
        k: int | None = None,
        observed: Tensor | None = None,
    ) -> Tensor:
        """One training step's gradients: sets every parameter's .grad to the gradient that
        `surrogates(model, x, config, generator, k=k, observed=observed)` followed by
        `backward` would accumulate from zero, and returns the detached bound [B]."""
        draws, stop_q = sampling_plan(config, k)
        log_w, forward = self._forward(x, draws, generator, observed, training=True)
        with torch.enable_grad():
            leaf = log_w.requires_grad_()  # [n, B], no history: the networks are not in it
            s = surrogates_of(leaf, config)
            if s.encoder is s.decoder:
                (u_enc,) = torch.autograd.grad(-s.encoder.mean(), leaf)
                u_dec = u_enc
            else:
                (u_enc,) = torch.autograd.grad(-s.encoder.mean(), leaf, retain_graph=True)
                (u_dec,) = torch.autograd.grad(-s.decoder.mean(), leaf)
        dz = self._decoder_backward(forward.buffers, u_dec.reshape(-1, 1), u_enc)
        self._encoder_backward(forward, dz, u_enc, stop_q)
        return s.bound

    def _forward(
        self,
        x: Tensor,
        n: int,
        generator: torch.Generator | None,
        observed: Tensor | None,
        *,
        training: bool,
    ) -> tuple[Tensor, _Forward]:
        """log w [n, B] and what the backward needs; x [B, D].

        In inference the decoder runs on blocks of about `_BLOCK_ROWS` rows, so that each
        block's logits stay in the cache between the product that writes them and the
        softplus that reads them; training keeps every row for the backward.
        """
        (w1, b1), (w2, b2), (w3, b3) = self._encoder
        x_in = x if observed is None else x * observed  # [B, D], missing pixels zero
        h1 = torch.addmm(b1, x_in, w1.t(), beta=2, alpha=2)  # [B, H]
        h1 = _tanh_of_half(h1, out=h1)
        h2 = torch.addmm(b2, h1, w2.t(), beta=2, alpha=2)
        h2 = _tanh_of_half(h2, out=h2)
        mu, logvar = torch.addmm(b3, h2, w3.t()).chunk(2, dim=-1)  # [B, d] each
        std = torch.exp(0.5 * logvar)
        eps = self._buffer(("eps", n, *mu.shape), lambda: torch.empty(n, *mu.shape).to(mu))
        torch.randn(eps.shape, generator=generator, out=eps)  # [n, B, d], drawn at once
        weights = self._augmented_weights()
        x_v3 = x_in @ weights[2]  # [B, H + 1]
        # log q's terms: -log q(z|x) = sum_j (logvar_j + eps_j^2) / 2 + const
        neg_log_q = 0.5 * (logvar.sum(-1) + eps.square().sum(-1))  # [n, B]
        block = n if training else max(1, _BLOCK_ROWS // len(x))
        parts = []
        for start in range(0, n, block):
            buf = self._buffers_for(min(block, n - start), x, training)
            z = torch.addcmul(mu, std, eps[start : start + block], out=buf.z_view)  # [m, B, d]
            parts.append(self._decode(buf, z, x_in, x_v3, weights, observed, training))
        log_w = (parts[0] if len(parts) == 1 else torch.cat(parts)) + neg_log_q  # [n, B]
        return log_w, _Forward(x_in, h1, h2, std, logvar, eps, buf)

    @staticmethod
    def _decode(
        buf: _Buffers,
        z: Tensor,
        x_in: Tensor,
        x_v3: Tensor,
        weights: list[Tensor],
        observed: Tensor | None,
        training: bool,
    ) -> Tensor:
        """log p(x_obs | z) + log p(z) (without log 2 pi) for z [m, B, d] in buf.z: [m, B]."""
        v1, v2, v3 = weights
        m, batch, _ = z.shape
        hidden = buf.g1.shape[1] - 1
        # A product into a strided view would go through a copy: into `product` first.
        product = torch.mm(buf.z, v1.t(), out=buf.product)  # [R, H]
        _tanh_of_half(product, out=buf.g1[:, :hidden])
        _tanh_of_half(torch.mm(buf.g1, v2.t(), out=product), out=buf.g2[:, :hidden])
        logits = torch.mm(buf.g2, v3.t(), out=buf.logits)  # [R, D]
        # sum_d o_d x_d l_d = [g2 1] . ([V3 | c3]^T (o x)): [m, B]
        g2 = buf.g2.view(m, batch, -1)  # [m, B, H + 1]
        x_dot_l = torch.mul(g2, x_v3, out=buf.scaled.view(m, batch, -1)).sum(-1)
        softplus = _softplus_sums(logits, buf.scratch, observed).view(m, batch)  # [m, B]
        log_p = x_dot_l - softplus - 0.5 * z.square().sum(-1)  # [m, B]
        if training:  # e = o x - o sigmoid(l) over the logits, which are not needed again
            e = torch.sigmoid(logits, out=logits).view(m, batch, -1)  # [m, B, D]
            if observed is not None:
                e.mul_(observed)
            torch.sub(x_in, e, out=e)
        return log_p

    def _decoder_backward(self, buf: _Buffers, u: Tensor, u_enc: Tensor) -> Tensor:
        """Sets the decoder's gradients for upstream u [R, 1] and returns dL/dz [n, B, d] for
        the encoder's upstream u_enc [n, B] (without q's terms)."""
        v1, v2, v3 = (w for w, _ in self._decoder)
        grad1, grad2, grad3 = self._weight_grads  # [dV | dc] of each layer
        hidden = v2.shape[0]
        e, scaled = buf.logits, buf.scaled  # [R, D], [R, H + 1]
        g1, g2 = buf.g1[:, :hidden], buf.g2[:, :hidden]  # [R, H], strided views
        torch.mm(e.t(), torch.mul(buf.g2, u, out=scaled), out=grad3)  # [D, H + 1]
        a2 = torch.ops.aten.tanh_backward.grad_input(
            torch.mm(e, v3, out=buf.product), g2, grad_input=buf.product
        )  # [R, H]
        torch.mm(a2.t(), torch.mul(buf.g1, u, out=scaled), out=grad2)  # [H, H + 1]
        a1 = torch.ops.aten.tanh_backward.grad_input(
            torch.mm(a2, v2, out=buf.back), g1, grad_input=buf.back
        )  # [R, H]
        latent = v1.shape[1]
        torch.mm(a1.t(), torch.mul(buf.z, u, out=scaled[:, : latent + 1]), out=grad1)
        for (w, b), grad in zip(self._decoder, self._weight_grads, strict=True):
            self._grad(w).copy_(grad[:, :-1])
            self._grad(b).copy_(grad[:, -1])
        a0 = (a1 @ v1).view(buf.z_view.shape)  # [n, B, d]
        return u_enc.unsqueeze(-1) * (a0 - buf.z_view)

    def _encoder_backward(self, f: _Forward, dz: Tensor, u_enc: Tensor, stop_q: bool) -> None:
        """Sets the encoder's gradients from dL/dz [n, B, d] (decoder and prior terms)."""
        (w1, b1), (w2, b2), (w3, b3) = self._encoder
        eps = f.eps  # [n, B, d]
        if stop_q:  # d log q(z; stopped mu, logvar) / dz = -eps exp(-logvar/2): enters -log q
            dz = dz + u_enc.unsqueeze(-1) * eps * inverse_std(f.logvar)
        d_mu = dz.sum(0)  # [B, d]
        d_logvar = 0.5 * f.std * (dz * eps).sum(0)  # dz/dlogvar = exp(logvar / 2) eps / 2
        if not stop_q:  # -log q = (logvar + eps^2) / 2 + const
            d_logvar += 0.5 * u_enc.sum(0).unsqueeze(-1)
        d_out = torch.cat([d_mu, d_logvar], dim=-1)  # [B, 2d]
        for (w, b), h_in, h_out in (
            ((w3, b3), f.h2, None),
            ((w2, b2), f.h1, f.h2),
            ((w1, b1), f.x_in, f.h1),
        ):
            if h_out is not None:  # through tanh: (1 - h^2)
                d_out = torch.ops.aten.tanh_backward(d_out, h_out)
            torch.mm(d_out.t(), h_in, out=self._grad(w))
            torch.sum(d_out, 0, out=self._grad(b))
            if h_in is not f.x_in:
                d_out = d_out @ w  # [B, H]

    def _augmented_weights(self) -> list[Tensor]:
        """[V | c] of each decoder layer, doubled before a tanh: [out, in + 1] each."""
        for (w, b), out, scale in zip(self._decoder, self._weights, (2.0, 2.0, 1.0), strict=True):
            torch.cat([w, b.unsqueeze(-1)], dim=-1, out=out).mul_(scale)
        return self._weights

    def _grad(self, p: nn.Parameter) -> Tensor:
        """p's gradient buffer, set as p.grad (the same tensor every step)."""
        grad = self._grads.get(p)
        if grad is None:
            grad = self._grads[p] = torch.empty_like(p)
        p.grad = grad
        return grad

    def _buffers_for(self, n: int, x: Tensor, training: bool) -> _Buffers:
        """The decoder's buffers for n samples of x [B, D]."""

        def make() -> _Buffers:
            rows, batch = n * x.shape[0], x.shape[0]
            hidden = self.model.config.hidden_dims[0]
            latent = self.model.config.latent_dims[0]
            new = {"dtype": x.dtype, "device": x.device}
            z = _with_ones_column(rows, latent, **new)
            logits = torch.empty(rows, x.shape[1], **new)
            return _Buffers(
                z=z,
                z_view=z[:, :latent].view(n, batch, latent),
                g1=_with_ones_column(rows, hidden, **new),
                g2=_with_ones_column(rows, hidden, **new),
                logits=logits,
                scratch=torch.empty_like(logits),
                scaled=torch.empty(rows, hidden + 1, **new),
                product=torch.empty(rows, hidden, **new),
                back=torch.empty(rows if training else 0, hidden, **new),
            )

        return self._buffer(("decoder", n, x.shape[0], training), make)

    def _buffer(self, key: tuple, make: Callable[[], T]) -> T:
        """The buffer of `key`, made once."""
        if key not in self._buffers:
            self._buffers[key] = make()
        return self._buffers[key]


def _softplus_sums(logits: Tensor, scratch: Tensor, observed: Tensor | None) -> Tensor:
    """sum_d o_d softplus(l_d) of each row of logits [R, D] -> [R]; scratch [R, D].

    Without a mask, softplus(l) = relu(l) - log sigmoid(|l|), and the logs are taken of
    products of `_FACTORS` factors sigmoid(|l|) in [1/2, 1] (at least 2^-112, above fp32's
    smallest normal 2^-126): one log per 112 pixels instead of an exp and a log1p per pixel,
    ~1.5x faster than PyTorch's softplus on the CPU, as accurate in fp32 (the rounding of the
    112-factor products is below that of the 784-term sum).
    """
    if observed is not None:
        softplus = torch.ops.aten.softplus.out(logits, 1, 20, out=scratch)  # [R, D]
        rows = softplus.view(-1, *observed.shape)  # [m, B, D]
        return rows.mul_(observed).sum(-1).view(-1)
    relu_sum = torch.clamp_min(logits, 0.0, out=scratch).sum(-1)  # [R]
    sigmoids = torch.abs(logits, out=scratch).sigmoid_()  # [R, D], in [1/2, 1]
    width = logits.shape[1]
    factors = max(f for f in range(1, min(width, _FACTORS) + 1) if width % f == 0)
    products = sigmoids.view(len(logits), width // factors, factors).prod(-1)  # [R, D/f]
    return relu_sum - products.log_().sum(-1)


def _tanh_of_half(t: Tensor, *, out: Tensor) -> Tensor:
    """tanh(t / 2) = 2 sigmoid(t) - 1 into `out` (t itself allowed); PyTorch's CPU sigmoid is
    ~4x faster than its tanh, and the two forms differ by ~1e-7 (absolute, |tanh| <= 1) in
    fp32."""
    return torch.sigmoid(t, out=out).mul_(2.0).sub_(1.0)


def _with_ones_column(rows: int, width: int, **new: object) -> Tensor:
    """[rows, width + 1], the last column ones (the bias's input)."""
    t = torch.empty(rows, width + 1, **new)
    t[:, -1] = 1.0
    return t


def _linears(mlp: nn.Sequential) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(weight, bias) of each linear layer of a Linear-Tanh-Linear-Tanh-Linear MLP."""
    return [(m.weight, m.bias) for m in mlp if isinstance(m, nn.Linear)]
