"""The CUDA training path: a step that never waits for the device, and its CUDA graph.

The CPU tests check what can be checked without a GPU: when `StepGraph` warms up, captures,
replays or falls back to an eager step; that the training step asks the device for no value
(no op that copies a scalar to the host); that a CPU run refuses `cuda_graphs` and TF32,
and that the TF32 switch holds for the training loop only. The tests
marked `cuda` run on a GPU only: every objective's step under
`torch.cuda.set_sync_debug_mode("error")`, an epoch that waits for the device only to read
the loss, and whole graphed runs against eager ones.

This module imports only `models` and its fixtures only from `tests/models/conftest.py`, so
a GPU machine without the service's web stack runs it with
`pytest --confcutdir=tests/models tests/models/test_cuda_graphs.py`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import Tensor

import models.training
from models.checkpoint import TrainState
from models.config import OBJECTIVES, ModelConfig, TrainConfig
from models.cuda_graphs import WARMUP_STEPS, StepGraph
from models.networks import IWAEModel
from models.progress import Progress
from models.training import _train_epoch, init_model, make_step, tf32_matmuls, train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D = 784
# Objectives, architectures and masks whose steps differ in what they launch.
STEP_CASES = {
    "iwae": {"objective": "iwae"},
    "dreg-2layers": {"objective": "iwae-dreg", "model": ModelConfig(layers=2, latent_dim=4)},
    "piwae-mcar": {"objective": "piwae", "m": 2, "missing_rate": 0.3},
    "vr-dreg-square": {
        "objective": "vr-iwae-dreg",
        "model": ModelConfig(layers=2, latent_dim=4),
        "missing_rate": 0.5,
        "missing_pattern": "random-square",
    },
    "miwae-top-half-bf16": {
        "objective": "miwae",
        "m": 2,
        "missing_rate": 0.5,
        "missing_pattern": "top-half",
        "precision": "bf16",
    },
}
# Every objective: those above and each remaining one on the one-layer model.
ALL_OBJECTIVES = {
    **STEP_CASES,
    **{
        name: {"objective": name}
        for name in OBJECTIVES
        if all(case.get("objective") != name for case in STEP_CASES.values())
    },
}
# Ops that copy a value from the device to the host: .item(), float(), bool(), nonzero().
HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero"}


def small_config(device: str, **changes: object) -> TrainConfig:
    values = {
        "k": 5,
        "epochs": 1,
        "batch_size": 20,
        "model": ModelConfig(layers=1, latent_dim=4, hidden_dim=32),
        "eval_size": 0,
        "device": device,
        **changes,
    }
    return TrainConfig(**values)


def grey_images(n: int, device: str = "cpu") -> Tensor:
    """`n` images of uniform grey levels: [n, D]."""
    return torch.rand(n, D, generator=torch.Generator().manual_seed(5)).to(device)


@dataclass
class Bound:
    """The step `train` runs for a config, what it updates, and a batch for it."""

    step: Callable[[Tensor, int], None]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    loss_sum: Tensor
    batch: Tensor


def bound_step(config: TrainConfig) -> Bound:
    device = torch.device(config.device)
    model = init_model(config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4, fused=True)
    generator = torch.Generator(device).manual_seed(0)
    loss_sum = torch.zeros((), device=device)
    step = make_step(config, model, optimizer, generator, loss_sum)
    return Bound(step, optimizer, generator, loss_sum, grey_images(config.batch_size, device))


# --- CPU: the step reads nothing back ---


def host_reads(fn: object) -> set[str]:
    """Names of the ops of `fn()` that copy a device value to the host.

    Reads inside the fused Adam kernel are left out: its CPU kernel reads the step count
    where it lives, on the host, while the CUDA kernel reads it on the device (the `cuda`
    tests below check the whole step, Adam included).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {
        event.name
        for event in prof.events()
        if event.name in HOST_READS and not _inside(event, "aten::_fused_adam_")
    }


def _inside(event: object, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None and parent.name != name:
        parent = parent.cpu_parent
    return parent is not None


def test_host_reads_sees_a_read_back() -> None:
    x = torch.ones(3)
    assert host_reads(lambda: float(x.sum())) == {"aten::item", "aten::_local_scalar_dense"}
    assert host_reads(lambda: bool(x.sum() > 0)) >= {"aten::is_nonzero"}
    assert host_reads(lambda: x.sum() + 1) == set()


@pytest.mark.parametrize("case", ALL_OBJECTIVES)
def test_the_training_step_reads_nothing_back(case: str) -> None:
    run = bound_step(small_config("cpu", **ALL_OBJECTIVES[case]))
    run.step(run.batch, 5)  # Adam creates its state on the first step
    assert host_reads(lambda: run.step(run.batch, 5)) == set()
    assert torch.isfinite(run.loss_sum)


# --- CPU: when the graph is captured, replayed or bypassed ---


class RecordingGraph(StepGraph):
    """A `StepGraph` that records what it would do on the device instead of doing it."""

    def __init__(self, batch_shape: tuple[int, ...], lr: float = 1e-3) -> None:
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.eager: list[int] = []
        super().__init__(
            lambda batch, k: self.eager.append(k), self.optimizer, torch.Generator(), batch_shape
        )
        self.log: list[str] = []

    def run(self, shapes: list[int], k: int) -> list[str]:
        """Steps with batches of `shapes[i]` images; returns what each did."""
        self.log = []
        for n in shapes:
            self.log.append(self.action((n, D), k))
            self(torch.zeros(n, D), k)
        return self.log

    def _warmup(self, batch: Tensor, k: int) -> None:
        self._step(batch, k)

    def _capture(self, batch: Tensor, k: int) -> None:
        self._graph = object()  # any graph

    def _replay(self, batch: Tensor) -> None:
        pass


def test_a_graph_is_captured_after_the_warm_up_and_then_replayed() -> None:
    graph = RecordingGraph((20, D))
    steps = graph.run([20] * 5, k=5)
    assert WARMUP_STEPS == 2
    assert steps == ["warmup", "warmup", "capture", "replay", "replay"]
    assert graph.eager == [5, 5] and graph.captures == 1


def test_a_smaller_last_batch_runs_eagerly_and_keeps_the_graph() -> None:
    graph = RecordingGraph((20, D))
    first = graph.run([20, 20, 20, 20, 7], k=5)
    second = graph.run([20, 20, 20, 20, 7], k=5)
    assert first == ["warmup", "warmup", "capture", "replay", "eager"]
    assert second == ["replay"] * 4 + ["eager"]
    assert graph.captures == 1


def test_a_new_k_or_learning_rate_recaptures() -> None:
    graph = RecordingGraph((20, D))
    graph.run([20] * 4, k=1)
    assert graph.run([20] * 4, k=2) == ["warmup", "warmup", "capture", "replay"]
    graph.optimizer.param_groups[0]["lr"] = 1e-4
    assert graph.run([20] * 4, k=2) == ["warmup", "warmup", "capture", "replay"]
    assert graph.run([20] * 2, k=2) == ["replay", "replay"]
    assert graph.captures == 3


# --- CPU: the setting is refused where it cannot work ---


# The settings that need a CUDA GPU, and the start of the message that refuses each.
GPU_ONLY = {
    "cuda_graphs": ({"cuda_graphs": True}, "cuda_graphs"),
    "tf32": ({"precision": "tf32"}, "precision 'tf32'"),
}


@pytest.mark.parametrize("setting", GPU_ONLY)
def test_a_cpu_config_refuses_gpu_only_settings(setting: str) -> None:
    changes, name = GPU_ONLY[setting]
    with pytest.raises(ValueError, match=f"{name} needs a CUDA GPU"):
        small_config("cpu", **changes)
    small_config("auto", **changes)  # the device is not known yet


@pytest.mark.parametrize("setting", GPU_ONLY)
def test_training_without_a_gpu_refuses_gpu_only_settings(
    setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes, name = GPU_ONLY[setting]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"{name} needs a CUDA GPU"):
        train(small_config("auto", **changes), grey_images(40))


def tf32_during(config: TrainConfig, images: Tensor) -> set[bool]:
    """The TF32 switch as the training loop's callbacks saw it."""
    seen: set[bool] = set()
    train(config, images, callbacks=[lambda _: seen.add(torch.backends.cuda.matmul.allow_tf32)])
    return seen


@pytest.fixture
def tf32_switch() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_switch")
@pytest.mark.parametrize("process_has", [False, True])
def test_tf32_switch_is_set_for_training_only(process_has: bool) -> None:
    """fp32 training forbids TF32 whatever the process set, and leaves the switch as it was;
    also when the loop raises."""
    torch.backends.cuda.matmul.allow_tf32 = process_has
    assert tf32_during(small_config("cpu"), grey_images(40)) == {False}
    assert torch.backends.cuda.matmul.allow_tf32 is process_has
    with pytest.raises(RuntimeError, match="stop"), tf32_matmuls(enabled=not process_has):
        assert torch.backends.cuda.matmul.allow_tf32 is not process_has
        raise RuntimeError("stop")
    assert torch.backends.cuda.matmul.allow_tf32 is process_has


def test_configs_from_before_cuda_graphs_read_as_eager() -> None:
    record = small_config("cpu").to_dict()
    del record["cuda_graphs"]
    assert TrainConfig.from_dict(record).cuda_graphs is False


# --- CUDA ---


@cuda
@pytest.mark.parametrize("case", ALL_OBJECTIVES)
def test_the_cuda_step_never_synchronizes(case: str) -> None:
    run = bound_step(small_config("cuda", **ALL_OBJECTIVES[case]))
    run.step(run.batch, 5)  # first-step allocations (Adam's state, cuBLAS) out of the way
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            run.step(run.batch, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(run.loss_sum.cpu())


def synchronizations(fn: Callable[[], object]) -> int:
    """How many times `fn()` makes the host wait for the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@cuda
def test_a_cuda_epoch_synchronizes_only_to_read_the_loss() -> None:
    """120 steps: the loss is read after steps 50, 100 and 120, and nothing else waits."""
    config = small_config("cuda")
    run = bound_step(config)
    images = grey_images(120 * config.batch_size, "cuda")
    run.step(run.batch, 5)
    per_read = synchronizations(lambda: float(run.loss_sum.zero_()))
    epoch = (config, run.optimizer, run.generator, images, TrainState(k=5), 120, run.step)
    assert per_read >= 1
    assert synchronizations(lambda: _train_epoch(*epoch, run.loss_sum, ())) == 3 * per_read


class CountingGraph(StepGraph):
    instances: ClassVar[list[CountingGraph]] = []

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.replays = 0
        CountingGraph.instances.append(self)

    def _replay(self, batch: Tensor) -> None:
        super()._replay(batch)
        self.replays += 1


def run(config: TrainConfig, images: Tensor) -> tuple[IWAEModel, list[float]]:
    """The trained model and the loss read back at each epoch end."""
    losses: list[float] = []

    def record(progress: Progress) -> None:
        if progress.done == progress.total:
            losses.append(progress.loss)

    return train(config, images, callbacks=[record]).model, losses


# 250 images in batches of 20: 12 full batches (graphed) and one of 10 (eager) per epoch.
GRAPH_CASES = {
    **STEP_CASES,
    "linear-k": {"objective": "iwae", "k_schedule": "linear", "k_min": 1, "epochs": 3},
    "burda-lr": {"objective": "iwae-stl", "schedule": "burda", "epochs": 2},
    "iwae-tf32": {"objective": "iwae", "precision": "tf32"},
}


@cuda
@pytest.mark.usefixtures("tf32_switch")
def test_tf32_training_uses_tf32_products() -> None:
    images = grey_images(60, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    assert tf32_during(small_config("cuda", precision="tf32"), images) == {True}
    assert torch.backends.cuda.matmul.allow_tf32 is False


@cuda
@pytest.mark.parametrize("case", GRAPH_CASES)
def test_graphed_training_equals_eager_training(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same weights and losses within fp32 rounding (the same kernels, random draws and
    order: bit for bit unless a kernel is nondeterministic), with every full batch after the
    warm-up replayed."""
    changes = {"epochs": 2, **GRAPH_CASES[case]}
    images = grey_images(250, "cuda")
    eager_model, eager_losses = run(small_config("cuda", **changes), images)
    CountingGraph.instances = []
    monkeypatch.setattr(models.training, "StepGraph", CountingGraph)
    graph_model, graph_losses = run(small_config("cuda", cuda_graphs=True, **changes), images)

    (graph,) = CountingGraph.instances
    epochs = changes["epochs"]
    captures = epochs if case in ("linear-k", "burda-lr") else 1  # K or lr change every epoch
    assert graph.captures == captures
    assert graph.replays == 12 * epochs - WARMUP_STEPS * captures
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, a), b in zip(
        eager_model.state_dict().items(), graph_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
