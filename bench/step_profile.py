"""Where a training step's time goes: the host's time to launch it against the device's time
to run it, and the kernels that take the device's time.

Usage: python bench/step_profile.py [--device cuda] [--ks 1 50 100] [--steps 200]

For each K, the step of `models.training` (Burda's one-layer model, batch 100, fp32) runs
eagerly and, on a GPU, replayed as a CUDA graph (`cuda_graphs`), on uniform grey levels:
  host ms   time to issue one step, without waiting for the device
  total ms  time per step, waiting for the device at the end of `steps` steps
When host ~ total, the host's launches are the bottleneck (what a CUDA graph removes); when
host << total, the device's kernels are. First, torch.profiler's table of the eager step's
costliest ops at the largest K (self time on the device first on a GPU).
"""

from __future__ import annotations

import argparse
import time

import torch

from models.config import ModelConfig, TrainConfig
from models.training import ADAM_EPS, init_model, make_step, resolve_device

BATCH, D = 100, 784
WARMUP = 5  # steps before timing: Adam's state, cuBLAS's first calls, a graph's capture


def bound_step(k: int, device: torch.device, cuda_graphs: bool):
    config = TrainConfig(
        k=k,
        batch_size=BATCH,
        device=device.type,
        cuda_graphs=cuda_graphs,
        eval_size=0,
        model=ModelConfig(layers=1, latent_dim=50, hidden_dim=200),
    )
    model = init_model(config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=ADAM_EPS, fused=True)
    generator = torch.Generator(device).manual_seed(0)
    return make_step(config, model, optimizer, generator, torch.zeros((), device=device))


def time_steps(step, batches: torch.Tensor, k: int) -> tuple[float, float]:
    """(host ms, total ms) per step over `batches` [steps, B, D]."""
    for batch in batches[:WARMUP]:
        step(batch, k)
    _synchronize(batches.device)
    start = time.perf_counter()
    for batch in batches:
        step(batch, k)
    host = time.perf_counter() - start
    _synchronize(batches.device)
    total = time.perf_counter() - start
    return 1e3 * host / len(batches), 1e3 * total / len(batches)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 50, 100])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    batches = torch.rand(args.steps, BATCH, D, generator=generator).to(device)

    k = max(args.ks)
    step = bound_step(k, device, cuda_graphs=False)
    for batch in batches[:WARMUP]:
        step(batch, k)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for batch in batches[:20]:
            step(batch, k)
        _synchronize(device)
    print(f"the eager step at K={k}, 20 steps:")
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=8, max_name_column_width=50))

    print(f"\ndevice={device} torch={torch.__version__} batch={BATCH} steps={args.steps}")
    print(f"{'K':>4} {'step':<7} {'host ms':>8} {'total ms':>9} {'img/s':>9}")
    for k in args.ks:
        for graphs in (False, True) if gpu else (False,):
            host, total = time_steps(bound_step(k, device, graphs), batches, k)
            name = "graph" if graphs else "eager"
            print(f"{k:>4} {name:<7} {host:>8.3f} {total:>9.3f} {1e3 * BATCH / total:>9.0f}")


if __name__ == "__main__":
    main()
