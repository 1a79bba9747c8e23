"""Stacked training: runs that share a shape train as one batched model in one process.

A study is many small runs: seeds, objectives and K of Burda's one-layer model, and a K=1
or K=5 step is a few small products and about a hundred small operations. Runs whose step
has the same shapes (the same network, samples per image, batch and training set) are
stacked here along a leading member dimension G, so that every operation of the fast path
(`models.fastpath`) runs once for all members: `torch.bmm`/`baddbmm` over [G, ...] instead
of G `mm`s, one launch instead of G on a GPU. On this 2-core CPU it buys little
(bench/stacked.py, README Performance: 1.12x per cell at K=1, 0.94x at K=5, 2 threads,
whole epochs): the products, Adam and the draws cost the same stacked or not, and the
elementwise passes are per element, not per operation.

Every member stays its own run. Its parameters are views into the stacked tensors (so the
products read them in place), with its own fused Adam (state, step count, learning rate of
its own epoch), its own `torch.Generator` drawing its own permutation, binarization and
importance samples in the order its solo run draws them, its own checkpoint, progress
callbacks and result. A member therefore ends where its solo `models.training.train` run
ends, to rounding (the batched products round differently from single ones:
tests/models/test_stacked.py, 1e-10 in float64). The objective's gradient with respect to
log w is taken per member (`models.objectives.surrogates_of`), so members may differ in
objective (`vae`, `iwae`, `iwae-dreg`, ... at the same K) and in learning-rate schedule.

Why batched products rather than `torch.func` (`vmap` over `functional_call` with stacked
parameters): `vmap` batches the autograd reference path, which the fast path already beats
at every K, and its random draws cannot come from one generator per member, so each member's
noise would have to be drawn outside it anyway. Measured on this CPU (1 thread, process CPU
time, three members, Burda's network, batch 100, the gradients of a step without Adam):
`vmap(grad(...))` of a plain IWAE loss took 61 ms at K=5 and 21 ms at K=1, the stacked
fast path 29 ms and 13 ms.

A member whose loss turns non-finite fails alone (`MemberResult.error`; its checkpoint stays
at its last finite epoch end), a member whose callback asks to stop stops alone, and a member
whose epochs are done leaves the group: the others go on, restacked without it. Members may
resume from checkpoints at different epochs: each trains its own next epoch at every pass
(all have the same steps per epoch), until its own `epochs`.

Runs the fast path does not cover, or whose shape changes during training, train alone
(`stack_key` is None: two stochastic layers, bf16, CUDA graphs, a K schedule, missing pixels).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from models.checkpoint import TrainState, save_checkpoint
from models.config import ModelConfig, TrainConfig
from models.distributions import inverse_std
from models.fastpath import _linears, _softplus_sums, _tanh_of_half, _with_ones_column
from models.files import Write, write_atomic
from models.k_schedule import initial_k, next_k
from models.networks import IWAEModel
from models.objectives import sampling_plan, surrogates_of
from models.progress import Callback, notify
from models.training import (
    ADAM_EPS,
    LOSS_SYNC_STEPS,
    TrainResult,
    binarize,
    flush_denormals,
    init_model,
    learning_rate,
    resolve_device,
    restore_checkpoint,
    step_progress,
    tf32_matmuls,
)

# Decoder rows of a group at most (members x K x batch) in `stack_groups`, per device. On a
# CPU 4,096: 3 seeds up to K=13 at batch 100; a K=50 step is its products there, and
# stacking gained nothing (bench/stacked.py: 0.94x CPU time at 1 thread), while a larger
# group holds G times the [rows, D] buffers (a K=5000 cell alone: 3 GB). A GPU is filled only
# by far larger products (a K=1 step is ~100 small kernels): there the cap is memory's,
# 262,144 rows (1.6 GB), so the seed's whole K=100 group (6 cells, 60,000 rows) stacks.
MAX_GROUP_ROWS = {"cpu": 4096, "cuda": 262_144}
# What runs after each epoch of a member: (its model, the epoch just ended, its epochs).
EpochEnd = Callable[[IWAEModel, int, int], None]


def stack_key(config: TrainConfig) -> tuple | None:
    """What the runs of one group share; None for a run that must train alone.

    Members share the network, the samples drawn per image, the batch, the training set, the
    device and the precision; they may differ in objective (at equal samples per image),
    seed, epochs and learning rate.
    """
    if (
        config.model.layers != 1
        or config.precision == "bf16"
        or config.cuda_graphs
        or config.k_schedule != "fixed"
        or config.missing_rate > 0
    ):
        return None
    draws, _ = sampling_plan(config)
    return (
        config.model,
        draws,
        config.batch_size,
        config.train_size,
        config.device,
        config.precision,
    )


def stack_groups(configs: Sequence[TrainConfig], max_rows: int | None = None) -> list[list[int]]:
    """Indices of `configs` grouped by `stack_key`, groups in order of their first member,
    each of at most `max_rows` decoder rows (members x samples per image x batch; one member
    at least; None: `MAX_GROUP_ROWS` of the configs' device); a config with no key is a group
    of its own."""
    groups: dict[object, list[list[int]]] = {}
    for index, config in enumerate(configs):
        key = stack_key(config)
        chunks = groups.setdefault(index if key is None else key, [[]])
        rows = sampling_plan(config)[0] * config.batch_size
        limit = max_rows or MAX_GROUP_ROWS[resolve_device(config.device).type]
        if chunks[-1] and (len(chunks[-1]) + 1) * rows > limit:
            chunks.append([])
        chunks[-1].append(index)
    return sorted((chunk for chunks in groups.values() for chunk in chunks), key=min)


@dataclass
class MemberResult(TrainResult):
    """A member's `TrainResult`; `error` says why it failed (it diverged, or its checkpoint
    could not be resumed or written), None otherwise. `train_seconds` is its share of the
    group's wall time: each step's time divided among the members that took it."""

    error: str | None = None


def train_stacked(
    configs: Sequence[TrainConfig],
    train_images: Tensor,
    *,
    checkpoint_paths: Sequence[Path | None] | None = None,
    callbacks: Sequence[Sequence[Callback]] | None = None,
    writes: Sequence[Write] | None = None,
    epoch_ends: Sequence[EpochEnd | None] | None = None,
) -> list[MemberResult]:
    """Train each of `configs` as `models.training.train` would, stacked in one process.

    All configs must share one `stack_key` (see `stack_groups`). The i-th member resumes from
    and writes `checkpoint_paths[i]` (through `writes[i]`, see `models.files.Write`) and
    reports to `callbacks[i]`; a callback returning True stops that member only. After each
    of its epochs, once its checkpoint is written, `epoch_ends[i](model, epoch, epochs)` runs
    (a learning curve's point: `models.curve`). Returns one result per config, in order.
    """
    keys = {stack_key(c) for c in configs}
    if not configs or None in keys or len(keys) > 1:
        raise ValueError("train_stacked needs configs of one stack_key (see stack_groups)")
    count = len(configs)
    paths = list(checkpoint_paths or [None] * count)
    member_callbacks = list(callbacks or [()] * count)
    member_writes = list(writes or [write_atomic] * count)
    member_epoch_ends = list(epoch_ends or [None] * count)
    first = configs[0]
    device = resolve_device(first.device)
    if first.precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision 'tf32' needs a CUDA GPU; this run would train on {device}")
    images = train_images[: first.train_size].to(device)  # [N, D]
    if first.train_size is not None and len(images) < first.train_size:
        raise ValueError(f"train_size={first.train_size} exceeds the {len(images)} images")
    pixel_mean = images.mean(0)  # [D]
    members = [
        _Member.start(config, device, pixel_mean, path, calls, write, epoch_end)
        for config, path, calls, write, epoch_end in zip(
            configs, paths, member_callbacks, member_writes, member_epoch_ends, strict=True
        )
    ]
    steps_per_epoch = -(-len(images) // first.batch_size)
    with flush_denormals(), tf32_matmuls(first.precision == "tf32"):
        while any(m.running for m in members):
            _train_epoch(members, images, steps_per_epoch)
    return [m.result(len(images)) for m in members]


@dataclass
class _Member:
    """One run of a group and where it stands."""

    config: TrainConfig
    model: IWAEModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    state: TrainState
    checkpoint: Path | None
    callbacks: Sequence[Callback]
    write: Write
    epoch_end: EpochEnd | None = None
    stopped: bool = False
    error: str | None = None
    order: Tensor = field(default_factory=lambda: torch.empty(0))  # this epoch's permutation

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        device: torch.device,
        pixel_mean: Tensor,
        checkpoint: Path | None,
        callbacks: Sequence[Callback],
        write: Write,
        epoch_end: EpochEnd | None = None,
    ) -> _Member:
        """The member as `train` sets up a run: its initial weights, Adam and generator,
        resumed from `checkpoint` when that file exists."""
        model = init_model(config, device, pixel_mean)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.learning_rate, eps=ADAM_EPS, fused=True
        )
        generator = torch.Generator(device).manual_seed(config.seed)
        member = cls(
            config,
            model,
            optimizer,
            generator,
            TrainState(),
            checkpoint,
            callbacks,
            write,
            epoch_end,
        )
        if checkpoint is not None and Path(checkpoint).exists():
            try:
                member.state = restore_checkpoint(
                    checkpoint, config, model, optimizer, generator, device
                )
            except ValueError as exc:  # this member fails; the group goes on without it
                member.error = f"cannot resume from {checkpoint}: {exc}"
        if member.state.k is None:
            member.state.k = initial_k(config)
        model.train()
        return member

    @property
    def running(self) -> bool:
        return not self.stopped and self.error is None and self.state.epoch < self.config.epochs

    def end_epoch(self) -> None:
        """Record the finished epoch as `train` does, and write the checkpoint (a storage that
        refuses the write raises, as in `train`)."""
        self.state.epoch += 1
        self.state.k_history.append(self.state.k)
        self.state.k = next_k(self.config, self.state.epoch, self.state.k, None)
        if self.checkpoint is not None:
            try:
                save_checkpoint(
                    self.checkpoint,
                    self.model,
                    self.optimizer,
                    self.config,
                    self.state,
                    self.generator,
                    write=self.write,
                )
            except OSError as exc:  # this member fails; the group goes on without it
                self.error = f"cannot write its checkpoint: {type(exc).__name__}: {exc}"
                return
        if self.epoch_end is not None:
            self.epoch_end(self.model, self.state.epoch, self.config.epochs)

    def result(self, images_per_epoch: int) -> MemberResult:
        _own_storage(self.model)
        return MemberResult(
            model=self.model.eval(),
            stopped=self.stopped,
            epochs_done=self.state.epoch,
            steps=self.state.step,
            train_seconds=self.state.train_seconds,
            images_per_epoch=images_per_epoch,
            k_history=list(self.state.k_history),
            error=self.error,
        )


def _train_epoch(members: list[_Member], images: Tensor, steps_per_epoch: int) -> None:
    """Every running member's next epoch, in lockstep; members stop, fail or leave on the way."""
    active = [m for m in members if m.running]
    for member in active:
        for group in member.optimizer.param_groups:
            group["lr"] = learning_rate(member.config, member.state.epoch)
    orders = torch.stack(
        [torch.randperm(len(images), generator=m.generator, device=images.device) for m in active]
    )  # [G, N], each member's own shuffle
    config = active[0].config
    draws, latent = sampling_plan(config)[0], config.model.latent_dims[0]
    path = StackedFastPath([m.model for m in active])
    loss_sums = images.new_zeros(len(active))  # [G], each member's loss since the last read
    window = 0
    start = time.perf_counter()
    last = start
    for i in range(steps_per_epoch):
        batch = images[orders[:, i * config.batch_size : (i + 1) * config.batch_size]]  # [G, B, D]
        generators = [m.generator for m in active]
        x, eps = draw_noise(batch, generators, draws, latent)
        bound = path.set_gradients(x, eps, [m.config for m in active])  # [G, B]
        for member in active:
            member.optimizer.step()
        loss_sums.sub_(bound.mean(1))
        window += 1
        done = i + 1
        now = time.perf_counter()
        losses: list[float | None] = [None] * len(active)
        if window == LOSS_SYNC_STEPS or done == steps_per_epoch:
            losses = (loss_sums / window).tolist()
            loss_sums.zero_()
            window = 0
        leaving = []
        for j, member in enumerate(active):
            member.state.step += 1
            member.state.train_seconds += (now - last) / len(active)
            loss = losses[j]
            if loss is not None and not math.isfinite(loss):
                member.error = (
                    f"diverged: the training loss became {loss} in epoch "
                    f"{member.state.epoch + 1}, step {done}"
                )
                leaving.append(j)
            elif _notify(member, done, steps_per_epoch, loss, now - start):
                member.stopped = True
                leaving.append(j)
        last = now
        if leaving:
            kept = [j for j in range(len(active)) if j not in leaving]
            if not kept:
                return
            active = [active[j] for j in kept]
            orders, loss_sums = orders[kept], loss_sums[kept]
            path = StackedFastPath([m.model for m in active])
    for member in active:
        member.end_epoch()


def _notify(member: _Member, done: int, steps: int, loss: float | None, elapsed: float) -> bool:
    """Tell the member's callbacks about its step; True when one asks it to stop."""
    progress = step_progress(member.config, member.state, done, steps, loss, elapsed)
    # Every callback sees every step, even when an earlier one asks to stop (as in `train`).
    return notify(member.callbacks, progress)


def _own_storage(model: IWAEModel) -> None:
    """Give the model's parameters storage of their own again (they were views of a stack)."""
    for p in model.parameters():
        p.data = p.detach().clone()
        p.grad = None


@dataclass
class _Buffers:
    """The decoder's tensors for G members of n samples of B images, allocated once.

    As in `models.fastpath._Buffers`, with a leading member dimension; z, g1 and g2 carry a
    last column of ones, so that one product with [V | c] also adds the bias.
    """

    z: Tensor  # [G, R, d + 1]
    z_view: Tensor  # [G, n, B, d], z without its ones column
    g1: Tensor  # [G, R, H + 1]
    g2: Tensor  # [G, R, H + 1]
    logits: Tensor  # [G, R, D]; holds e after the forward
    scratch: Tensor  # [G, R, D], for the softplus
    scaled: Tensor  # [G, R, H + 1]: rows of g times the upstream
    product: Tensor  # [G, R, H]
    back: Tensor  # [G, R, H]

    @classmethod
    def make(cls, members: int, n: int, batch: int, model: ModelConfig, like: Tensor) -> _Buffers:
        rows, hidden, latent = n * batch, model.hidden_dims[0], model.latent_dims[0]
        new = {"dtype": like.dtype, "device": like.device}
        z = _with_ones_column(members * rows, latent, **new).view(members, rows, latent + 1)
        logits = torch.empty(members, rows, model.x_dim, **new)
        return cls(
            z=z,
            z_view=z[:, :, :latent].view(members, n, batch, latent),
            g1=_with_ones_column(members * rows, hidden, **new).view(members, rows, -1),
            g2=_with_ones_column(members * rows, hidden, **new).view(members, rows, -1),
            logits=logits,
            scratch=torch.empty_like(logits),
            scaled=torch.empty(members, rows, hidden + 1, **new),
            product=torch.empty(members, rows, hidden, **new),
            back=torch.empty(members, rows, hidden, **new),
        )


@dataclass
class _Forward:
    """What the backward needs of one forward: each [G, ...] of `models.fastpath._Forward`."""

    x: Tensor  # [G, B, D]
    h1: Tensor  # [G, B, H]
    h2: Tensor  # [G, B, H]
    std: Tensor  # [G, B, d]
    logvar: Tensor  # [G, B, d]
    eps: Tensor  # [G, n, B, d]
    buffers: _Buffers


class StackedFastPath:
    """The fast path's training step (`models.fastpath.FastPath.set_gradients`) for G
    one-layer models of one config at once.

    On construction each model's parameters become views into stacked [G, ...] tensors (their
    values and identities kept, so optimizers and checkpoints see them as before), and their
    .grad views into stacked gradients, which `set_gradients` fills.
    """

    def __init__(self, models: Sequence[IWAEModel]) -> None:
        configs = {m.config for m in models}
        if len(configs) != 1 or models[0].config.layers != 1:
            raise ValueError("stacked members must share one one-layer ModelConfig")
        self.config = models[0].config
        self.members = len(models)
        self._encoder, self._encoder_grads = _stack_linears([m.encoders[0].net for m in models])
        self._decoder, self._decoder_grads = _stack_linears([m.decoders[0] for m in models])
        # [V | c] of each decoder layer (doubled before a tanh) and its gradient: [G, out, in+1]
        self._weights = [torch.empty(*w.shape[:2], w.shape[2] + 1).to(w) for w, _ in self._decoder]
        self._weight_grads = [torch.empty_like(w) for w in self._weights]
        self._buffers: dict[tuple[int, int], _Buffers] = {}

    @torch.no_grad()
    def set_gradients(self, x: Tensor, eps: Tensor, configs: Sequence[TrainConfig]) -> Tensor:
        """Each member's gradients for its binary batch x[g] [B, D] and standard normal draws
        eps[g] [n, B, d], as its solo fast path (`FastPath.set_gradients(x[g], configs[g],
        generator)`) sets them when its generator draws eps[g]; returns the detached bounds
        [G, B]. `draw_noise` draws x and eps as the solo runs do."""
        stop_q = [sampling_plan(c)[1] for c in configs]
        log_w, forward = self._forward(x, eps)  # [G, n, B]
        u_enc, u_dec, bound = _upstreams(log_w, configs)
        dz = self._decoder_backward(forward.buffers, u_dec.view(self.members, -1, 1), u_enc)
        self._encoder_backward(forward, dz, u_enc, stop_q)
        return bound

    def _forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, _Forward]:
        """log w [G, n, B] and what the backward needs; x [G, B, D], eps [G, n, B, d]."""
        (w1, b1), (w2, b2), (w3, b3) = self._encoder
        h1 = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2), beta=2, alpha=2)  # [G, B, H]
        h1 = _tanh_of_half(h1, out=h1)
        h2 = torch.baddbmm(b2.unsqueeze(1), h1, w2.transpose(1, 2), beta=2, alpha=2)
        h2 = _tanh_of_half(h2, out=h2)
        mu, logvar = torch.baddbmm(b3.unsqueeze(1), h2, w3.transpose(1, 2)).chunk(2, dim=-1)
        std = torch.exp(0.5 * logvar)  # [G, B, d]
        n, batch = eps.shape[1:3]
        buf = self._buffers.get((n, batch))
        if buf is None:
            buf = self._buffers[n, batch] = _Buffers.make(self.members, n, batch, self.config, x)
        v1, v2, v3 = self._augmented_weights()
        x_v3 = torch.bmm(x, v3)  # [G, B, H + 1]
        neg_log_q = 0.5 * (logvar.sum(-1).unsqueeze(1) + eps.square().sum(-1))  # [G, n, B]
        z = torch.addcmul(mu.unsqueeze(1), std.unsqueeze(1), eps, out=buf.z_view)  # [G, n, B, d]
        hidden = self.config.hidden_dims[0]
        product = torch.bmm(buf.z, v1.transpose(1, 2), out=buf.product)  # [G, R, H]
        _tanh_of_half(product, out=buf.g1[:, :, :hidden])
        product = torch.bmm(buf.g1, v2.transpose(1, 2), out=buf.product)
        _tanh_of_half(product, out=buf.g2[:, :, :hidden])
        logits = torch.bmm(buf.g2, v3.transpose(1, 2), out=buf.logits)  # [G, R, D]
        g2 = buf.g2.view(*z.shape[:3], -1)  # [G, n, B, H + 1]
        scaled = buf.scaled.view(g2.shape)
        x_dot_l = torch.mul(g2, x_v3.unsqueeze(1), out=scaled).sum(-1)  # [G, n, B]
        rows = logits.view(-1, logits.shape[-1])  # [G R, D]
        softplus = _softplus_sums(rows, buf.scratch.view(rows.shape), None).view(z.shape[:3])
        log_w = x_dot_l - softplus - 0.5 * z.square().sum(-1) + neg_log_q  # [G, n, B]
        # e = x - sigmoid(l) over the logits, which are not needed again: [G, n, B, D]
        e = torch.sigmoid(logits, out=logits).view(*z.shape[:3], -1)
        torch.sub(x.unsqueeze(1), e, out=e)
        return log_w, _Forward(x, h1, h2, std, logvar, eps, buf)

    def _decoder_backward(self, buf: _Buffers, u: Tensor, u_enc: Tensor) -> Tensor:
        """Sets the decoder's gradients for upstream u [G, R, 1] and returns dL/dz
        [G, n, B, d] for the encoder's upstream u_enc [G, n, B] (without q's terms); the
        products of `models.fastpath.FastPath._decoder_backward`, batched."""
        v1, v2, v3 = (w for w, _ in self._decoder)
        grad1, grad2, grad3 = self._weight_grads  # [G, out, in + 1]
        hidden, latent = v2.shape[1], v1.shape[2]
        e, scaled = buf.logits, buf.scaled  # [G, R, D], [G, R, H + 1]
        g1, g2 = buf.g1[:, :, :hidden], buf.g2[:, :, :hidden]  # [G, R, H]
        torch.bmm(e.transpose(1, 2), torch.mul(buf.g2, u, out=scaled), out=grad3)
        a2 = torch.ops.aten.tanh_backward.grad_input(
            torch.bmm(e, v3, out=buf.product), g2, grad_input=buf.product
        )  # [G, R, H]
        torch.bmm(a2.transpose(1, 2), torch.mul(buf.g1, u, out=scaled), out=grad2)
        a1 = torch.ops.aten.tanh_backward.grad_input(
            torch.bmm(a2, v2, out=buf.back), g1, grad_input=buf.back
        )  # [G, R, H]
        z_u = torch.mul(buf.z, u, out=scaled[:, :, : latent + 1])  # [G, R, d + 1]
        torch.bmm(a1.transpose(1, 2), z_u, out=grad1)
        for (w, b), grad in zip(self._decoder_grads, self._weight_grads, strict=True):
            w.copy_(grad[:, :, :-1])
            b.copy_(grad[:, :, -1])
        a0 = torch.bmm(a1, v1).view(buf.z_view.shape)  # [G, n, B, d]
        return u_enc.unsqueeze(-1) * (a0 - buf.z_view)

    def _encoder_backward(
        self, f: _Forward, dz: Tensor, u_enc: Tensor, stop_q: Sequence[bool]
    ) -> None:
        """Sets the encoder's gradients from dL/dz [G, n, B, d]; `stop_q[g]`: member g's
        objective stops q's parameters inside log q (STL, DReG)."""
        eps = f.eps  # [G, n, B, d]
        # Members of mixed objectives: a 0/1 factor per member (exact: x * 1 = x, x + 0 = x),
        # built only for them, not a host-to-device copy at every step of one objective.
        mixed = any(stop_q) and not all(stop_q)
        if mixed:
            stop = torch.tensor(stop_q).to(dz).view(-1, 1, 1)  # [G, 1, 1]
        if any(stop_q):  # d log q(z; stopped mu, logvar) / dz = -eps exp(-logvar/2)
            q_term = u_enc.unsqueeze(-1) * eps * inverse_std(f.logvar).unsqueeze(1)
            dz = dz + (q_term * stop.unsqueeze(-1) if mixed else q_term)
        d_mu = dz.sum(1)  # [G, B, d]
        d_logvar = 0.5 * f.std * (dz * eps).sum(1)  # dz/dlogvar = exp(logvar / 2) eps / 2
        if not all(stop_q):  # -log q = (logvar + eps^2) / 2 + const
            log_q_term = 0.5 * u_enc.sum(1).unsqueeze(-1)  # [G, B, 1]
            d_logvar += log_q_term * (1 - stop) if mixed else log_q_term
        d_out = torch.cat([d_mu, d_logvar], dim=-1)  # [G, B, 2d]
        (w1, _), (w2, _), (w3, _) = self._encoder
        grads = self._encoder_grads
        for (w, (grad_w, grad_b)), h_in, h_out in (
            ((w3, grads[2]), f.h2, None),
            ((w2, grads[1]), f.h1, f.h2),
            ((w1, grads[0]), f.x, f.h1),
        ):
            if h_out is not None:  # through tanh: (1 - h^2)
                d_out = torch.ops.aten.tanh_backward(d_out, h_out)
            torch.bmm(d_out.transpose(1, 2), h_in, out=grad_w)
            torch.sum(d_out, 1, out=grad_b)
            if h_in is not f.x:
                d_out = torch.bmm(d_out, w)  # [G, B, H]

    def _augmented_weights(self) -> list[Tensor]:
        """[V | c] of each decoder layer, doubled before a tanh: [G, out, in + 1] each."""
        for (w, b), out, scale in zip(self._decoder, self._weights, (2.0, 2.0, 1.0), strict=True):
            torch.cat([w, b.unsqueeze(-1)], dim=-1, out=out).mul_(scale)
        return self._weights


def draw_noise(
    batch: Tensor, generators: Sequence[torch.Generator], draws: int, latent: int
) -> tuple[Tensor, Tensor]:
    """Each member's binarization of its grey levels batch[g] [B, D] and its standard normal
    draws [n, B, d], from generators[g] in the order its solo step draws them: x [G, B, D],
    eps [G, n, B, d]."""
    x = torch.empty_like(batch)
    eps = batch.new_empty(len(generators), draws, batch.shape[1], latent)
    for g, generator in enumerate(generators):
        binarize(batch[g], generator, out=x[g])
        torch.randn(eps.shape[1:], generator=generator, out=eps[g])
    return x, eps


def _upstreams(log_w: Tensor, configs: Sequence[TrainConfig]) -> tuple[Tensor, Tensor, Tensor]:
    """dL/d log w of each member's encoder and decoder surrogates, [G, n, B] each, and the
    detached bounds [G, B], from log_w [G, n, B].

    Members of one objective share one autograd call: their log-weights side by side as
    [n, g B] (every objective acts on each column alone), each member's loss the mean over
    its own B columns, as `FastPath.set_gradients` takes it.
    """
    members, n, batch = log_w.shape
    u_enc, u_dec, bound = torch.empty_like(log_w), torch.empty_like(log_w), log_w[:, 0].clone()
    objectives: dict[tuple, list[int]] = {}
    for g, c in enumerate(configs):
        objectives.setdefault((c.objective, c.m, c.beta, c.alpha), []).append(g)
    with torch.enable_grad():
        for group in objectives.values():
            index = slice(None) if len(group) == members else group
            size = len(group)
            leaf = log_w[index].transpose(0, 1).reshape(n, size * batch)  # [n, g B]
            leaf = leaf.detach().requires_grad_()
            s = surrogates_of(leaf, configs[group[0]])
            encoder_loss = -s.encoder.view(size, batch).mean(1).sum()
            if s.encoder is s.decoder:
                (enc,) = torch.autograd.grad(encoder_loss, leaf)
                dec = enc
            else:
                (enc,) = torch.autograd.grad(encoder_loss, leaf, retain_graph=True)
                (dec,) = torch.autograd.grad(-s.decoder.view(size, batch).mean(1).sum(), leaf)
            u_enc[index] = enc.view(n, size, batch).transpose(0, 1)
            u_dec[index] = dec.view(n, size, batch).transpose(0, 1)
            bound[index] = s.bound.view(size, batch)
    return u_enc, u_dec, bound


def _stack_linears(
    mlps: Sequence[nn.Sequential],
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """(weight, bias) of each linear layer, stacked over the members' MLPs, and their
    gradients: [G, out, in] and [G, out]. Each member's parameters become views into them."""
    stacked, grads = [], []
    for layer in zip(*(_linears(mlp) for mlp in mlps), strict=True):  # one layer, G members
        pair, pair_grads = [], []
        for index in (0, 1):  # weight, bias
            params = [member[index] for member in layer]
            values = torch.stack([p.detach() for p in params])  # [G, ...]
            grad = torch.zeros_like(values)
            for g, p in enumerate(params):
                p.data = values[g]
                p.grad = grad[g]
            pair.append(values)
            pair_grads.append(grad)
        stacked.append((pair[0], pair[1]))
        grads.append((pair_grads[0], pair_grads[1]))
    return stacked, grads
