"""Training and evaluation time against this machine's matrix-multiply floor.

Usage: python bench/roofline.py [--ks 1 5 50] [--train-size 60000] [--eval-images 100]
                                [--eval-k 5000] [--repeats 2] [--device cpu|cuda]
                                [--precision fp32|tf32] [--skip-reference] [--threads N]
                                [--json FILE]
       python bench/roofline.py --profile [--ks 50]          (CPU only)

The floor of a training step is the time of exactly its matrix products: the forward,
weight-gradient and input-gradient products of Burda's one-layer model (784-200-200-50, the
decoder on K*B rows, batch B=100, no input gradient for the encoder's first layer), each timed
alone with the same shapes, layouts, dtype (fp32), float settings and threads, best of several
runs, and summed. The epoch floor is that times the steps of a 60k-image epoch; the fraction
reached is floor / measured epoch. `ours` is `models.training.train` (the fast path where it
applies, see models/fastpath.py), `reference` the same trainer on its autograd path (the
fast path switched off), both timed over whole epochs, `--repeats` times each, alternating.

On a GPU (`--device cuda`) both sides train as a GPU worker would, with `cuda_graphs`, after
an untimed short epoch (kernel loading, cuBLAS's first calls, the graph's capture); each
product of the floor is timed as 20 back-to-back calls recorded in a CUDA graph, so the floor
is the device's time, not the host's time to launch a small kernel; only wall time is shown
(the host's CPU time says nothing of the device's). `--precision tf32` (GPU only) trains
with TF32 matrix products and times the floor under the same setting; the evaluation always
runs in fp32 (`--eval-images 0` skips it).

The evaluation is Burda's protocol, log p(x) of the 10,000 test images at k=5000, through
`models.estimators.log_likelihood` in its batches of 100 images; it times `--eval-images`
of them and scales the time to 10,000 (said in the output). Its floor is the forward products
of each chunk of samples the estimator draws (the decoder on chunk*B rows; the encoder once
per batch). Also printed: the machine's GEMM rate at that precision (2048^3 on a CPU,
8192^3 on a GPU, best of 10), and the subnormal (flush-to-zero) setting and thread count
that each side ran with. Ratios within one run are what count: other processes sharing the
machine slow every figure.

`--profile` shows where a fast-path training step (each K of --ks) and an evaluation chunk
spend their time: every operation's time per call against its own floor, a matrix product's
time alone at that shape, or for the others the bytes they read and write at the machine's
copy bandwidth (measured in the same run); exp, log1p and sigmoid are compute-bound, so their
bandwidth floor understates them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from bench_args import add_data_dir_argument

from models import estimators
from models.config import ModelConfig, TrainConfig
from models.data import Mnist, binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.fastpath import FastPath
from models.networks import IWAEModel
from models.training import flush_denormals, resolve_device, tf32_matmuls, train

BATCH = 100
D, H, Z = 784, 200, 50
TEST_IMAGES = 10_000
# Calls of one product recorded in a CUDA graph and timed together (see `best_seconds`).
GRAPH_CALLS = 20
# (in, out) of each linear layer; the encoder outputs mean and log-variance.
ENCODER = ((D, H), (H, H), (H, 2 * Z))
DECODER = ((Z, H), (H, H), (H, D))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call of fn."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def best_seconds(
    fn: Callable[[], object],
    device: torch.device,
    repeats: int = 10,
    clock: int = 0,
    graph: bool = True,
) -> float:
    """Best of `repeats` calls in wall time (`clock` 0) or process CPU time (1). On a GPU
    (with `graph`), wall time of `GRAPH_CALLS` calls replayed from a CUDA graph, divided by
    them: a small kernel runs in less time than the host takes to launch it, and a floor is
    the device's time."""
    fn()  # warm-up, before any capture: cuBLAS's handle and workspace
    calls = 1
    if device.type == "cuda" and graph:
        fn, calls = _graphed(fn, GRAPH_CALLS), GRAPH_CALLS
    return min(timed(fn, device)[clock] for _ in range(repeats)) / calls


def _graphed(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    """A function that replays `calls` calls of fn recorded as one CUDA graph."""
    side = torch.cuda.Stream()  # a warm-up on a side stream first, as PyTorch's notes ask
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def gemm_seconds(
    m: int, n: int, k: int, device: torch.device, layout: str, clock: int = 0
) -> float:
    """Best time of one fp32 product [m, k] @ [k, n] in the layout nn.Linear uses:
    `forward` x @ W^T, `data` g @ W, `weight` g^T @ x."""
    if layout == "forward":  # x [m, k], W [n, k]
        a, b = torch.randn(m, k, device=device), torch.randn(n, k, device=device).t()
    elif layout == "data":  # g [m, k], W [k, n]
        a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    else:  # g^T: g [k, m]; x [k, n]
        a, b = torch.randn(k, m, device=device).t(), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    return best_seconds(lambda: torch.mm(a, b, out=out), device, clock=clock)


def step_floor(rows: int, device: torch.device, clock: int = 0) -> float:
    """Seconds of the matrix products of one training step, decoder on `rows` = K*B rows."""
    total = 0.0
    for layers, m in ((ENCODER, BATCH), (DECODER, rows)):
        for i, (n_in, n_out) in enumerate(layers):
            total += gemm_seconds(m, n_out, n_in, device, "forward", clock)
            total += gemm_seconds(n_out, n_in, m, device, "weight", clock)
            if not (layers is ENCODER and i == 0):  # x needs no gradient
                total += gemm_seconds(m, n_in, n_out, device, "data", clock)
    return total


def eval_floor(k: int, device: torch.device, clock: int = 0) -> float:
    """Seconds of the forward products of one batch of B images at `k` samples, in the
    estimator's chunks."""
    chunk = estimators._CHUNK_ELEMENTS // (BATCH * D)
    sizes = [min(chunk, k - start) for start in range(0, k, chunk)]
    total = sum(
        gemm_seconds(BATCH, n_out, n_in, device, "forward", clock) for n_in, n_out in ENCODER
    )
    for size in set(sizes):
        per_chunk = sum(
            gemm_seconds(size * BATCH, n_out, n_in, device, "forward", clock)
            for n_in, n_out in DECODER
        )
        total += sizes.count(size) * per_chunk
    return total


def gemm_rate(device: torch.device) -> float:
    """GFLOP/s of a square product: 2048 on a CPU, 8192 on a GPU (which smaller ones leave
    partly idle); long enough on either that launching it costs nothing."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return 2 * n**3 / best_seconds(lambda: a @ b, device, graph=False) / 1e9


def epoch_seconds(images: torch.Tensor, k: int, precision: str, fast: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one epoch of `train`, on the fast path or the reference; on a
    GPU as a GPU worker trains (CUDA graphs)."""
    config = TrainConfig(
        k=k,
        epochs=1,
        batch_size=BATCH,
        device=images.device.type,
        precision=precision,
        cuda_graphs=images.device.type == "cuda",
        eval_size=0,
        model=ModelConfig(layers=1, latent_dim=Z, hidden_dim=H),
    )
    off = mock.patch("models.training.fast_path", return_value=None)
    with contextlib.nullcontext() if fast else off:
        return timed(lambda: train(config, images), images.device)


class _Reference:
    """Hides the model's type from the estimator, which then runs its autograd-free
    reference `IWAEModel.log_weights` instead of the fast path."""

    def __init__(self, model: IWAEModel) -> None:
        self.log_weights = model.log_weights


def eval_seconds(model: IWAEModel, x: torch.Tensor, k: int, fast: bool) -> tuple[float, float]:
    """(wall, CPU) seconds to score x [N, D] in batches of B, as `evaluation.evaluate` does."""
    scored = model if fast else _Reference(model)
    generator = torch.Generator(x.device).manual_seed(0)

    def score() -> None:
        for i in range(0, len(x), BATCH):
            log_likelihood(scored, x[i : i + BATCH], k, generator=generator)

    return timed(score, x.device)


def machine_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, cores and vector extensions (from /proc/cpuinfo)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", info, re.MULTILINE).group(1).split())
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    name = model.group(1) if model else platform.machine()
    return f"{name}, {os.cpu_count()} cores, {' '.join(vector)}"


def copy_bandwidth(device: torch.device, numel: int = 1 << 24) -> float:
    """Bytes per second of a large copy (read and write), best of 10."""
    a, b = torch.empty(numel, device=device), torch.randn(numel, device=device)
    return 8 * numel / best_seconds(lambda: a.copy_(b), device)


def op_floor(name: str, shapes: list[list[int]], bandwidth: float, device: torch.device) -> float:
    """Seconds one call of `name` needs at least: a product alone at its shape, or its
    bytes (inputs, and the output of in-place ops) at the copy bandwidth."""
    if name in ("aten::mm", "aten::addmm"):
        first = 0 if name == "aten::mm" else 1  # addmm's first argument is the bias
        (m, k), (_, n) = shapes[first], shapes[first + 1]
        return gemm_seconds(m, n, k, device, "data")
    elements = sum(math.prod(s) for s in shapes if s)
    if elements <= len(shapes):  # only scalars and lists of tensors seen: no floor
        raise ValueError(name)
    if name.endswith("_"):  # in place: the first argument is written back too
        elements += math.prod(shapes[0])
    return 4 * elements / bandwidth


def profile(fn: Callable[[], object], calls: int, device: torch.device, title: str) -> None:
    """Per-operation time of `calls` calls of fn, against each operation's floor."""
    fn()
    bandwidth = copy_bandwidth(device)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
    ) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    events = sorted(
        prof.key_averages(group_by_input_shape=True),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )
    total = sum(e.self_cpu_time_total for e in events) / 1e3 / calls
    print(f"{title}: {total:.2f} ms per call; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"  {'operation':<28} {'shapes':<44} {'ms/call':>8} {'floor ms':>9} {'x floor':>8}")
    for e in events[:20]:
        ms = e.self_cpu_time_total / 1e3 / calls
        shapes = [list(s) if isinstance(s, list | tuple) else [] for s in e.input_shapes]
        try:
            floor = op_floor(e.key, shapes, bandwidth, device) * 1e3 * e.count / calls
            ratio = f"{ms / floor:>7.1f}x" if floor > 0 else ""
            floor_text = f"{floor:>9.3f}"
        except (ValueError, IndexError, TypeError):
            floor_text, ratio = f"{'':>9}", ""
        shape_text = str([s for s in shapes if s])[:44]
        print(f"  {e.key:<28} {shape_text:<44} {ms:>8.3f} {floor_text} {ratio}")


def profile_fast_path(ks: list[int], device: torch.device) -> None:
    """`profile` of a fast-path training step at each K, and of one evaluation chunk."""
    torch.manual_seed(0)
    model = IWAEModel(ModelConfig(layers=1, latent_dim=Z, hidden_dim=H)).to(device)
    x = torch.bernoulli(torch.full((BATCH, D), 0.13, device=device))  # MNIST's mean grey
    generator = torch.Generator(device).manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), eps=1e-4, fused=True)
    fast = FastPath(model)
    with flush_denormals():
        for k in ks:
            config = TrainConfig(k=k, model=model.config)

            def step(config: TrainConfig = config) -> None:
                fast.set_gradients(x, config, generator)
                optimizer.step()

            profile(step, 10, device, f"training step, K={k}, flush-to-zero on")
    chunk = estimators._CHUNK_ELEMENTS // (BATCH * D)
    with torch.inference_mode():
        evaluation = FastPath(model)
        profile(
            lambda: evaluation.log_weights(x, chunk, generator),
            10,
            device,
            f"evaluation chunk, {chunk} samples x {BATCH} images, flush-to-zero off",
        )


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}" if len(values) == 1 else f"{min(values):.1f}-{max(values):.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--train-size", type=int, default=60_000)
    parser.add_argument("--eval-images", type=int, default=100, help="0 skips the evaluation")
    parser.add_argument("--eval-k", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "tf32"])
    parser.add_argument("--skip-reference", action="store_true")
    add_data_dir_argument(parser)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.profile and gpu:
        parser.error("--profile times the host's side of each op: on a GPU, use step_profile.py")
    if args.precision == "tf32" and not gpu:
        parser.error("--precision tf32 needs --device cuda")
    if args.profile:
        profile_fast_path(args.ks, device)
        return
    data = load_mnist(args.data_dir)
    images = data.train_images[: args.train_size].to(device)
    steps = -(-len(images) // BATCH)
    sides = ["ours"] if args.skip_reference else ["ours", "reference"]
    clocks = (0,) if gpu else (0, 1)  # wall; and process CPU time, on a CPU only

    name = machine_name(device)
    print(
        f"device={device} ({name}) torch={torch.__version__} "
        f"threads={torch.get_num_threads()} dtype=fp32 precision={args.precision}"
    )
    # As training runs: subnormals flushed (a CPU setting), TF32 products when asked.
    with flush_denormals(), tf32_matmuls(args.precision == "tf32"):
        rate = gemm_rate(device)
        floors = {k: [step_floor(k * BATCH, device, clock) for clock in clocks] for k in args.ks}
    print(f"{args.precision} GEMM rate (best of 10): {rate:.0f} GFLOP/s")
    print(
        f"training: {len(images)} images/epoch, batch {BATCH}, {steps} steps; floor and "
        f"epochs with flush-to-zero on (train() sets it), {torch.get_num_threads()} threads"
        + (", CUDA graphs" if gpu else "")
        + f"; {args.repeats} epochs per side, alternating, after an untimed short one; "
        + (
            "seconds min-max, in wall time"
            if gpu
            else "seconds min-max, in wall time and in process CPU time (robust to other "
            "processes at 1 thread)"
        )
    )
    print(row_header(clocks))
    report = {"device": str(device), "name": name, "torch": torch.__version__}
    report |= {"precision": args.precision, "gemm_gflops": rate, "train": [], "eval": []}
    warm_up = 10 if gpu else 2  # batches: on a GPU, enough for the graph's capture
    for k in args.ks:
        runs: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
        for side in sides:  # warm-up: first calls, allocations
            epoch_seconds(images[: warm_up * BATCH], k, args.precision, side == "ours")
        for _ in range(args.repeats):
            for side in sides:
                runs[side].append(epoch_seconds(images, k, args.precision, side == "ours"))
        floor = [f * steps for f in floors[k]]
        for side in sides:
            print(row(f"{k:>3} {side:<9}", runs[side], floor))
            best = min(wall for wall, _ in runs[side])
            report["train"].append({"k": k, "side": side, "seconds": best, "floor_s": floor[0]})
    if args.eval_images > 0:
        report["eval"] = evaluation(data, args, device, sides, clocks)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1))


def evaluation(
    data: Mnist,
    args: argparse.Namespace,
    device: torch.device,
    sides: list[str],
    clocks: tuple[int, ...],
) -> list[dict]:
    """Times Burda's evaluation (scaled to the test set) against its floor; the rows."""
    torch.manual_seed(0)
    model = IWAEModel(ModelConfig(layers=1, latent_dim=Z, hidden_dim=H)).to(device).eval()
    test_x = binarized_test_images(data.test_images[: args.eval_images]).to(device)
    scale = TEST_IMAGES / len(test_x)
    torch.set_flush_denormal(False)  # as `evaluate` runs
    floor = [eval_floor(args.eval_k, device, clock) * TEST_IMAGES / BATCH for clock in clocks]
    print(
        f"evaluation: {TEST_IMAGES} test images at k={args.eval_k}, timed on {len(test_x)} "
        f"and scaled x{scale:g}; fp32, flush-to-zero off (as evaluate runs), "
        f"{torch.get_num_threads()} threads"
    )
    print(row_header(clocks))
    runs = {side: [] for side in sides}
    for side in sides:  # warm-up
        eval_seconds(model, test_x[:1], args.eval_k, side == "ours")
    for _ in range(args.repeats):
        for side in sides:
            wall, cpu = eval_seconds(model, test_x, args.eval_k, side == "ours")
            runs[side].append((wall * scale, cpu * scale))
    rows = []
    for side in sides:
        print(row(f"eval {side:<9}", runs[side], floor))
        best = min(wall for wall, _ in runs[side])
        rows.append({"k": args.eval_k, "side": side, "seconds": best, "floor_s": floor[0]})
    return rows


# Column titles and widths of each clock: wall time, process CPU time.
_CLOCKS = (("wall", 10), ("cpu", 9))


def row_header(clocks: tuple[int, ...]) -> str:
    cells = [
        f"{_CLOCKS[c][0] + ' s':>11} {'floor s':>8} {'floor/' + _CLOCKS[c][0]:>{_CLOCKS[c][1]}}"
        for c in clocks
    ]
    return f"{'':<13} {' '.join(cells)}"


def row(label: str, runs: list[tuple[float, float]], floor: list[float]) -> str:
    """One side's runs, each (wall, CPU) seconds, against the floor of each clock shown;
    fractions of the best run."""
    cells = []
    for clock, floor_s in enumerate(floor):
        values = [r[clock] for r in runs]
        width = _CLOCKS[clock][1]
        cells.append(f"{spread(values):>11} {floor_s:>8.2f} {floor_s / min(values):>{width}.0%}")
    return f"{label:<13} {' '.join(cells)}"


if __name__ == "__main__":
    main()
