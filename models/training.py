"""The training loop: a plain function with callbacks, resumable from its checkpoints.

Callbacks see a "train" `Progress` (`models.progress`) after every step and may return True
to stop the loop (the worker uses this for cancellation). Checkpoints are written at epoch
ends; a run resumed from one continues exactly as an uninterrupted run would, because the
checkpoint holds the weights, Adam's state and the generator that draws every shuffle,
binarization, missing-pixel mask and importance sample.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from models.checkpoint import TrainState, load_checkpoint, save_checkpoint
from models.config import TrainConfig
from models.cuda_graphs import StepGraph
from models.fastpath import FastPath, fast_path
from models.files import Write, write_atomic
from models.k_schedule import held_out_ess, initial_k, next_k
from models.missing import draw_observed
from models.networks import IWAEModel, burda_init
from models.objectives import backward, surrogates
from models.progress import Callback, Progress, notify

# Burda et al.: 3^i epochs at learning rate 1e-3 * 10^(-i/7), for i = 0..7.
BURDA_STAGES = 8
ADAM_EPS = 1e-4
# Steps between reading the loss back from the device; a read forces a host synchronisation.
LOSS_SYNC_STEPS = 50


@dataclass
class TrainResult:
    """`images_per_epoch`: the training images of one epoch (without the `ess` schedule's
    held-out batch); `k_history`: the K of each completed epoch; `ess_history`: the held-out
    ESS/K after each (`ess` schedule only)."""

    model: IWAEModel
    stopped: bool
    epochs_done: int
    steps: int
    train_seconds: float
    images_per_epoch: int
    k_history: list[int] = field(default_factory=list)
    ess_history: list[float] = field(default_factory=list)


def burda_epochs() -> int:
    """Length of Burda's full schedule: sum of 3^i for i < 8 = 3280 epochs."""
    return sum(3**i for i in range(BURDA_STAGES))


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """Learning rate for 0-based `epoch`: constant, or Burda's stage-wise decay."""
    if config.schedule == "constant":
        return config.learning_rate
    stage, stage_end = 0, 1
    while epoch >= stage_end and stage < BURDA_STAGES - 1:
        stage += 1
        stage_end += 3**stage
    return config.learning_rate * 10.0 ** (-stage / 7.0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return torch.device(name)


def init_model(
    config: TrainConfig, device: torch.device, pixel_mean: Tensor | None = None
) -> IWAEModel:
    """Initial weights drawn from `config.seed`, leaving the global RNG as it was.

    With `config.init == "burda"`, `pixel_mean` [D] (the training images' mean grey level)
    sets the output bias of p(x|z) (see `models.networks.burda_init`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = IWAEModel(config.model)
        if config.init == "burda":
            burda_init(model, pixel_mean)
    return model.to(device)


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero on the CPU while training.

    Deep in IWAE training, tiny normalized weights make the backward pass fill with
    subnormals, which x86 CPUs process up to ~100x slower; their values are below 1e-38
    and do not change the results measurably.
    """
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """CUDA's fp32 matrix products with inputs rounded to TF32 when `enabled`, in full fp32
    otherwise (whatever the process had set), so a run's `precision` says what it did.

    TF32 keeps fp32's range with a 10-bit mantissa, so the products run on tensor cores
    (~10x the fp32 rate of an H100/H200); sums still accumulate in fp32. The switch is
    process-global: this sets it for the training loop only and restores it after (the
    final evaluation runs as the process had it), but other threads of the same process that
    use CUDA meanwhile see it too; the worker runs one job per process.
    """
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def train(
    config: TrainConfig,
    train_images: Tensor,
    *,
    checkpoint_path: Path | None = None,
    callbacks: Sequence[Callback] = (),
    write: Write = write_atomic,
) -> TrainResult:
    """Train on `train_images` [N, D] (grey levels in [0, 1], binarized afresh each epoch).

    Resumes from `checkpoint_path` when that file exists, and rewrites it at every epoch end
    (through `write`, see `models.files.Write`). Under the `ess` K schedule the last
    `batch_size` images are held out to measure ESS/K.
    """
    device = resolve_device(config.device)
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs a CUDA GPU; this run would train on {device}")
    if config.precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision 'tf32' needs a CUDA GPU; this run would train on {device}")
    images = train_images[: config.train_size].to(device)  # [N, D]
    if config.train_size is not None and len(images) < config.train_size:
        raise ValueError(f"train_size={config.train_size} exceeds the {len(images)} images")
    held_out = None
    if config.k_schedule == "ess":
        if len(images) <= config.batch_size:
            raise ValueError(
                f"k_schedule 'ess' holds out one batch ({config.batch_size} images) of the "
                f"{len(images)} training images: it needs more than one batch"
            )
        images, held_out = images[: -config.batch_size], images[-config.batch_size :]
    model = init_model(config, device, images.mean(0))
    # The fused kernel updates every parameter in one pass: a quarter of a K=1 step saved.
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.learning_rate, eps=ADAM_EPS, fused=True
    )
    generator = torch.Generator(device).manual_seed(config.seed)
    state = TrainState()
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = restore_checkpoint(checkpoint_path, config, model, optimizer, generator, device)
    if state.k is None:
        state.k = initial_k(config)

    steps_per_epoch = -(-len(images) // config.batch_size)
    loss_sum = images.new_zeros(())  # the summed loss of the steps since the last read-back
    step = make_step(config, model, optimizer, generator, loss_sum)
    stopped = False
    model.train()
    with flush_denormals(), tf32_matmuls(config.precision == "tf32"):
        while state.epoch < config.epochs and not stopped:
            stopped = _train_epoch(
                config,
                optimizer,
                generator,
                images,
                state,
                steps_per_epoch,
                step,
                loss_sum,
                callbacks,
            )
            if not stopped:
                _end_epoch(config, model, generator, held_out, state)
                if checkpoint_path is not None:
                    save_checkpoint(
                        checkpoint_path, model, optimizer, config, state, generator, write=write
                    )
    return TrainResult(
        model=model.eval(),
        stopped=stopped,
        epochs_done=state.epoch,
        steps=state.step,
        train_seconds=state.train_seconds,
        images_per_epoch=len(images),
        k_history=list(state.k_history),
        ess_history=list(state.ess_history),
    )


def _end_epoch(
    config: TrainConfig,
    model: IWAEModel,
    generator: torch.Generator,
    held_out: Tensor | None,
    state: TrainState,
) -> None:
    """Record the finished epoch's K and choose the next one (before the checkpoint)."""
    state.epoch += 1
    state.k_history.append(state.k)
    ess = None
    if held_out is not None:
        x = torch.bernoulli(held_out, generator=generator)  # [B, D], a fresh binarization
        ess = held_out_ess(model, x, config.k, generator)
        state.ess_history.append(ess)
    state.k = next_k(config, state.epoch, state.k, ess)


def make_step(
    config: TrainConfig,
    model: IWAEModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    loss_sum: Tensor,
) -> Callable[[Tensor, int], None]:
    """`step(batch, k)`: `train_step` bound to a run, replayed as a CUDA graph when
    `config.cuda_graphs`; each step adds its loss to `loss_sum` []."""
    # PyTorch's CUDA-graph notes ask for autocast's weight cache off in captured code; the
    # casts themselves are the same.
    autocast = torch.autocast(
        loss_sum.device.type,
        dtype=torch.bfloat16,
        enabled=config.precision == "bf16",
        cache_enabled=not config.cuda_graphs,
    )
    fast = fast_path(model, config)  # None: the autograd reference path
    step = functools.partial(
        train_step, config, model, fast, optimizer, generator, autocast, loss_sum
    )
    if config.cuda_graphs:
        return StepGraph(step, optimizer, generator, (config.batch_size, config.model.x_dim))
    return step


def train_step(
    config: TrainConfig,
    model: IWAEModel,
    fast: FastPath | None,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    autocast: torch.autocast,
    loss_sum: Tensor,
    batch: Tensor,
    k: int,
) -> None:
    """One optimisation step at K=`k` on grey levels `batch` [B, D], binarized afresh, by
    `fast` (see `models.fastpath`) or, when None, by autograd on `surrogates`.

    Adds the batch's loss (minus its mean bound) to `loss_sum` [] in place. Reads nothing
    back to the host, so on a GPU it only enqueues kernels, and `models.cuda_graphs` can
    record it as it is.
    """
    x = binarize(batch, generator)  # dynamic binarization, [B, D]
    observed = None
    if config.missing_rate > 0:  # a fresh mask per batch, from the job's generator
        observed = draw_observed(
            config.missing_pattern, config.missing_rate, *x.shape, generator, x.dtype
        )  # [B, D]
    if fast is not None:
        bound = fast.set_gradients(x, config, generator, k=k, observed=observed)
    else:
        with autocast:
            s = surrogates(model, x, config, generator, k=k, observed=observed)
        optimizer.zero_grad(set_to_none=True)
        backward(model, s)
        bound = s.bound
    optimizer.step()
    loss_sum.sub_(bound.mean())


def binarize(p: Tensor, generator: torch.Generator, *, out: Tensor | None = None) -> Tensor:
    """Binary pixels x ~ Bernoulli(p) for grey levels p, as `torch.bernoulli(p, generator)`
    draws them (the same values and the same draws from the generator).

    On the CPU both compare one uniform per pixel with p, drawn in the same order, and
    `rand < p` runs ~3x faster (0.27 against 0.85 ms for 100 images on this CPU, ~15% of
    a K=1 step); tests/models/test_training.py holds them equal. Elsewhere the generators
    draw differently: `bernoulli` as before.
    """
    if p.device.type != "cpu":
        return torch.bernoulli(p, generator=generator, out=out)
    below = torch.rand(p.shape, generator=generator, dtype=p.dtype) < p
    return below.to(p.dtype) if out is None else out.copy_(below)


def _train_epoch(
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    images: Tensor,
    state: TrainState,
    steps_per_epoch: int,
    step: Callable[[Tensor, int], None],
    loss_sum: Tensor,
    callbacks: Sequence[Callback],
) -> bool:
    """One pass over a fresh permutation and binarization; returns True when stopped.

    `step` is `make_step`'s; it adds each step's loss to `loss_sum`.
    """
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, state.epoch)
    order = torch.randperm(len(images), generator=generator, device=images.device)
    window = 0
    loss: float | None = None
    start = time.perf_counter()
    seconds_before = state.train_seconds
    for i in range(steps_per_epoch):
        step(images[order[i * config.batch_size : (i + 1) * config.batch_size]], state.k)
        state.step += 1
        window += 1
        done = i + 1
        if window == LOSS_SYNC_STEPS or done == steps_per_epoch:
            loss = float(loss_sum) / window
            loss_sum.zero_()
            window = 0
        elapsed = time.perf_counter() - start
        state.train_seconds = seconds_before + elapsed
        progress = step_progress(config, state, done, steps_per_epoch, loss, elapsed)
        if notify(callbacks, progress):
            return True
    return False


def step_progress(
    config: TrainConfig,
    state: TrainState,
    done: int,
    steps: int,
    loss: float | None,
    elapsed: float,
) -> Progress:
    """What callbacks see after step `done` of `steps` in the epoch `state` is training,
    `elapsed` seconds after the epoch began."""
    rate = done / elapsed if elapsed > 0 else 0.0
    remaining = (config.epochs - state.epoch) * steps - done
    return Progress(
        phase="train",
        done=done,
        total=steps,
        epoch=state.epoch + 1,
        epochs=config.epochs,
        loss=loss,
        images_per_s=rate * config.batch_size,
        eta_s=remaining / rate if rate > 0 else None,
        k=state.k,
    )


def restore_checkpoint(
    path: Path,
    config: TrainConfig,
    model: IWAEModel,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    device: torch.device,
) -> TrainState:
    """Load `path` into the run's model, optimizer and generator; its `TrainState`."""
    checkpoint = load_checkpoint(path, device)
    if checkpoint.config.model != config.model:
        raise ValueError(
            f"checkpoint {path} holds a {checkpoint.config.model} model, not {config.model}"
        )
    model.load_state_dict(checkpoint.model_state)
    optimizer.load_state_dict(checkpoint.optimizer_state)
    if checkpoint.generator_state.numel() == generator.get_state().numel():
        generator.set_state(checkpoint.generator_state)
    else:
        # Saved on another device type (a CPU generator's state is 5056 bytes, CUDA's 16):
        # go on with a stream seeded by (seed, epoch), reproducible but not the same draws.
        generator.manual_seed(config.seed * 1_000_003 + checkpoint.state.epoch)
    return checkpoint.state
