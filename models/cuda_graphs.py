"""The training step replayed as a CUDA graph (`TrainConfig.cuda_graphs`).

A step of Burda's model is about a hundred small kernels (forward, backward, Adam); at small K
a GPU runs each faster than the host can launch it, so the host's launch rate sets the
speed. A CUDA graph records the step's kernels once and replays them with one launch.

What a captured graph fixes, and what this module does when it changes:
- the batch shape: a batch of another shape (the last, smaller batch of an epoch) runs
  eagerly, and the graph is kept for the next epoch;
- K and the learning rate, baked into kernels as arguments: a change (a K schedule, Burda's
  learning-rate stages) drops the graph, and the next steps warm up and capture afresh;
- the addresses of every tensor it reads or writes: the batch is copied into a static
  buffer before each replay; parameters, Adam's state and the caller's loss accumulator are
  updated in place and never reallocated.

Random draws stay those of the eager step: the generator is registered with each graph, so
every replay advances it by exactly what the recorded kernels consume, and each kernel reads
the same (seed, offset) as it would eagerly. Warm-up and capture themselves are real steps of
the training run (run eagerly, then recorded and replayed), so the results do not depend on
how often a graph is captured.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import torch
from torch import Tensor

# Eager steps before each capture: Adam creates its state on its first step and cuBLAS picks
# its kernels for new shapes, neither of which may happen during a capture.
WARMUP_STEPS = 2

Action = Literal["eager", "warmup", "capture", "replay"]


class StepGraph:
    """`graph(batch, k)` performs `step(batch, k)` for grey-level batches of `batch_shape`.

    `step` must read nothing back to the host (no `.item()`, no data-dependent branch) and
    update its outputs in place; `optimizer` is the fused Adam it steps (its kernel is the
    same with or without `capturable`, which only gates the capture check).
    """

    def __init__(
        self,
        step: Callable[[Tensor, int], None],
        optimizer: torch.optim.Optimizer,
        generator: torch.Generator,
        batch_shape: tuple[int, ...],
    ) -> None:
        self._step = step
        self._optimizer = optimizer
        self._generator = generator
        self._shape = tuple(batch_shape)
        self._key: tuple[object, ...] | None = None
        self._warm = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._batch: Tensor | None = None  # the static input [B, D] the graph reads
        self._side: torch.cuda.Stream | None = None
        self.captures = 0

    def __call__(self, batch: Tensor, k: int) -> None:
        action = self.action(tuple(batch.shape), k)
        if action == "eager":
            self._step(batch, k)
        elif action == "warmup":
            self._warm += 1
            self._warmup(batch, k)
        else:
            if action == "capture":
                self._capture(batch, k)
                self.captures += 1
            self._replay(batch)

    def action(self, shape: tuple[int, ...], k: int) -> Action:
        """What the next step of `shape` at K=`k` does; forgets the graph when its K or
        learning rate no longer hold."""
        if shape != self._shape:
            return "eager"
        key = (k, *(group["lr"] for group in self._optimizer.param_groups))
        if key != self._key:
            self._key, self._warm, self._graph, self._batch = key, 0, None, None
        if self._graph is not None:
            return "replay"
        return "warmup" if self._warm < WARMUP_STEPS else "capture"

    def _warmup(self, batch: Tensor, k: int) -> None:
        """An eager step on a side stream, as captures require of the work they record."""
        if self._side is None:
            self._side = torch.cuda.Stream(device=batch.device)
        self._side.wait_stream(torch.cuda.current_stream(batch.device))
        with torch.cuda.stream(self._side):
            self._step(batch, k)
        torch.cuda.current_stream(batch.device).wait_stream(self._side)

    def _capture(self, batch: Tensor, k: int) -> None:
        """Record `step` on a static copy of `batch` (recording runs nothing)."""
        self._batch = torch.empty_like(batch)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self._generator)
        with _capturable(self._optimizer), torch.cuda.graph(graph):
            self._step(self._batch, k)
        self._graph = graph

    def _replay(self, batch: Tensor) -> None:
        self._batch.copy_(batch)
        self._graph.replay()


@contextlib.contextmanager
def _capturable(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Mark `optimizer` capturable while its step is recorded, and only then.

    Fused Adam runs the same kernel either way (its step count already lives on the
    device); outside a capture the flag would only make PyTorch warn on every eager step
    and change the optimizer state written to checkpoints.
    """
    saved = [group["capturable"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["capturable"] = True
    try:
        yield
    finally:
        for group, value in zip(optimizer.param_groups, saved, strict=True):
            group["capturable"] = value
