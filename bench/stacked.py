"""Stacked training against the same cells trained one after another, whole MNIST epochs.

Usage: python bench/stacked.py [--ks 1 5 50] [--seeds 3] [--epochs 1] [--train-size 60000]
                               [--threads 2] [--repeats 1] [--objective iwae]
                               [--data-dir ../shared/data/mnist]

For each K, `--seeds` cells of Burda's one-layer model (batch 100, fp32, Burda's init,
`--objective`, seeds 0, 1, ...) are trained for `--epochs` whole epochs of the training set:

  solo      each cell by `models.training.train`, one after another (the fast path)
  stacked   the same cells as one group by `models.stacked.train_stacked`

Both sides run in this process with the same float settings (fp32, subnormals flushed to
zero while training, as both trainers do) and `--threads` torch threads, after an untimed
warm-up of 5 steps each; `--repeats` alternates them. Printed per cell: wall seconds (the
measure at 2 threads, where process CPU time also counts OpenMP's spin-waits) and CPU
seconds, each side's best, the ratio solo / stacked (above 1: the group is faster per cell),
and the GEMM floor of one cell's epochs (`bench/roofline.py`'s `step_floor`, timed in the
same run). Also the largest difference between a solo cell's weights and its stacked twin's:
the same run, to fp32 rounding, but rounding differences grow over hundreds of Adam steps
as any change of summation order makes them grow (one solo run at 1 and at 2 threads: 0.056
after an epoch at K=5; the stacked and solo runs at 1 thread: 8e-5; exactness is tested
over a few steps in tests/models/test_stacked.py). Ratios within one run are what count:
other processes sharing the machine slow every figure.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_args import add_data_dir_argument
from roofline import step_floor

from models.config import TrainConfig
from models.data import load_mnist
from models.networks import IWAEModel
from models.stacked import train_stacked
from models.training import train


def cell_configs(k: int, seeds: int, objective: str, epochs: int, train_size: int) -> list:
    return [
        TrainConfig(
            k=k,
            objective=objective,
            seed=seed,
            epochs=epochs,
            train_size=train_size,
            eval_size=0,
            device="cpu",
        )
        for seed in range(seeds)
    ]


def timed_solo(configs: list[TrainConfig], images: torch.Tensor) -> tuple[float, float, list]:
    """(wall s, CPU s, models) of the cells trained one after another."""
    wall, cpu = time.perf_counter(), time.process_time()
    models = [train(config, images).model for config in configs]
    return time.perf_counter() - wall, time.process_time() - cpu, models


def timed_stacked(configs: list[TrainConfig], images: torch.Tensor) -> tuple[float, float, list]:
    """(wall s, CPU s, models) of the cells trained as one group."""
    wall, cpu = time.perf_counter(), time.process_time()
    results = train_stacked(configs, images)
    return time.perf_counter() - wall, time.process_time() - cpu, [r.model for r in results]


def largest_difference(a: list[IWAEModel], b: list[IWAEModel]) -> float:
    return max(
        (p - q).abs().max().item()
        for m, n in zip(a, b, strict=True)
        for p, q in zip(m.parameters(), n.parameters(), strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=60_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--objective", default="iwae")
    add_data_dir_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = load_mnist(args.data_dir).train_images
    print(
        f"{args.seeds} cells per K, {args.epochs} epoch(s) of {args.train_size} images, batch "
        f"100, {args.objective}, fp32, flush-to-zero on in training (both sides), "
        f"{torch.get_num_threads()} threads (both sides); seconds per cell, best of "
        f"{args.repeats}"
    )
    print(
        f"{'K':>3} {'solo wall':>10} {'stacked wall':>13} {'ratio':>6} {'solo cpu':>9} "
        f"{'stacked cpu':>12} {'ratio':>6} {'floor':>6} {'stacked/floor':>14} {'max |dw|':>9}"
    )
    for k in args.ks:
        configs = cell_configs(k, args.seeds, args.objective, args.epochs, args.train_size)
        warm_up = cell_configs(k, args.seeds, args.objective, 1, 500)  # untimed: first calls
        timed_solo(warm_up, images)
        timed_stacked(warm_up, images)
        solo, stacked = [], []
        for _ in range(args.repeats):
            solo.append(timed_solo(configs, images))
            stacked.append(timed_stacked(configs, images))
        steps = args.epochs * -(-args.train_size // 100)
        floor = step_floor(k * 100, torch.device("cpu")) * steps
        n = args.seeds
        solo_wall, stacked_wall = (min(r[0] for r in runs) / n for runs in (solo, stacked))
        solo_cpu, stacked_cpu = (min(r[1] for r in runs) / n for runs in (solo, stacked))
        difference = largest_difference(solo[0][2], stacked[0][2])
        print(
            f"{k:>3} {solo_wall:>10.2f} {stacked_wall:>13.2f} {solo_wall / stacked_wall:>5.2f}x "
            f"{solo_cpu:>9.2f} {stacked_cpu:>12.2f} {solo_cpu / stacked_cpu:>5.2f}x "
            f"{floor:>6.2f} {stacked_wall / floor:>13.2f}x {difference:>9.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
