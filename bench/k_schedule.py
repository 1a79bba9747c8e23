"""Adaptive K at an equal training budget: fixed K against the `linear` and `ess` schedules.

Usage: python bench/k_schedule.py [--seeds 0 1 2] [--train-size 10000] [--budget-epochs 8]
                                  [--k 50] [--eval-size 1000] [--eval-k 2000]
                                  [--data-dir ../shared/data/mnist] [--out runs/k_schedule.json]

The budget is a number of decoder sample evaluations: a training step with batch B and K
samples costs B*K (each pair (image, z) goes once through the decoder forward and backward,
which dominates a step's cost at K > 1). It equals `--budget-epochs` epochs of `--train-size`
images at K = `--k`. Each run trains until it has spent the budget (stopping within the step
that reaches it), then scores the first `--eval-size` test images (fixed binarization) with
the IWAE bound at `--eval-k` samples. Process CPU time is recorded alongside; on a shared
machine it is the fairer of the two clocks, but it still varies with contention.

- fixed:  K = k every epoch, `--budget-epochs` epochs.
- linear: K from 1 to k over the number of epochs whose linear K sum first reaches the
          budget (so the budget runs out in the last epoch, at K = k).
- ess:    K from 1, doubled or halved after each epoch by held-out ESS/K (default target),
          as many epochs as the budget allows.
- fixed K=c for each `--control-ks c`: a smaller fixed K given the same budget (more
          epochs), to tell a schedule's effect from that of a smaller mean K.
`--arms` picks which of fixed, linear, ess run (the controls always run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_args import add_data_dir_argument

from models.config import ModelConfig, TrainConfig
from models.data import binarized_test_images, load_mnist
from models.evaluation import evaluate
from models.k_schedule import linear_k
from models.progress import Progress
from models.training import train


class Budget:
    """Training callback: counts decoder sample evaluations, stops once `limit` is spent."""

    def __init__(self, limit: int, batch_size: int) -> None:
        self.limit = limit
        self.batch_size = batch_size  # every step's batch is full: sizes are multiples
        self.spent = 0
        self.k_by_epoch: dict[int, int] = {}

    def __call__(self, progress: Progress) -> bool:
        self.spent += progress.k * self.batch_size
        self.k_by_epoch[progress.epoch] = progress.k
        return self.spent >= self.limit


def linear_epochs(config: TrainConfig, per_epoch: int, budget: int) -> int:
    """Fewest epochs whose linear schedule (1 -> k) spends at least `budget`."""
    epochs = 1
    while True:
        candidate = config.with_changes(epochs=epochs)
        if sum(linear_k(candidate, e) for e in range(epochs)) * per_epoch >= budget:
            return epochs
        epochs += 1


def run(
    arm: str, config: TrainConfig, images: torch.Tensor, test_x: torch.Tensor, budget: int
) -> dict:
    meter = Budget(budget, config.batch_size)
    cpu = time.process_time()
    result = train(config, images, callbacks=[meter])
    train_cpu = time.process_time() - cpu
    metrics = evaluate(
        result.model, test_x, config.eval_k, generator=torch.Generator().manual_seed(0)
    )
    return {
        "arm": arm,
        "schedule": config.k_schedule,
        "seed": config.seed,
        "test_loglik": metrics.test_loglik,
        "test_loglik_std_error": metrics.test_loglik_std_error,
        "active_units": metrics.active_units,
        "samples": meter.spent,
        "train_cpu_s": train_cpu,
        "k_by_epoch": [meter.k_by_epoch[e] for e in sorted(meter.k_by_epoch)],
        "ess_per_epoch": result.ess_history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--budget-epochs", type=int, default=8)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--eval-k", type=int, default=2000)
    add_data_dir_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/k_schedule.json"))
    parser.add_argument(
        "--arms", nargs="*", choices=("fixed", "linear", "ess"), default=["fixed", "linear", "ess"]
    )
    parser.add_argument("--control-ks", type=int, nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core, steadier CPU time

    data = load_mnist(args.data_dir)
    test_x = binarized_test_images(data.test_images[: args.eval_size])
    base = TrainConfig(
        k=args.k,
        batch_size=100,
        model=ModelConfig(),
        train_size=args.train_size,
        eval_size=args.eval_size,
        eval_k=args.eval_k,
        device="cpu",
    )
    budget = args.k * args.train_size * args.budget_epochs
    linear = base.with_changes(k_schedule="linear", k_min=1)
    linear = linear.with_changes(epochs=linear_epochs(linear, args.train_size, budget))
    schedules = {
        "fixed": base.with_changes(epochs=args.budget_epochs),
        "linear": linear,
        "ess": base.with_changes(k_schedule="ess", k_min=1, epochs=10 * args.budget_epochs),
    }
    arms = {f"fixed K={args.k}" if name == "fixed" else name: schedules[name] for name in args.arms}
    for c in args.control_ks:
        arms[f"fixed K={c}"] = base.with_changes(k=c, epochs=-(-budget // (c * args.train_size)))
    rows = []
    for seed in args.seeds:
        for arm, config in arms.items():
            row = run(arm, config.with_changes(seed=seed), data.train_images, test_x, budget)
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"budget": budget, "rows": rows}, indent=2))
    print(
        f"\nbudget: {budget:,} decoder sample evaluations ({args.budget_epochs} epochs of "
        f"{args.train_size} images at K={args.k}); test: {args.eval_size} images, "
        f"IWAE bound k={args.eval_k}, nats"
    )
    print("| arm | test log p(x), mean ± sd over seeds | per seed | CPU s (mean) |")
    print("|---|---:|---|---:|")
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        values = [r["test_loglik"] for r in mine]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(
            f"| {arm} | {statistics.mean(values):.2f} ± {sd:.2f} | "
            f"{', '.join(f'{v:.2f}' for v in values)} | "
            f"{statistics.mean(r['train_cpu_s'] for r in mine):.0f} |"
        )


if __name__ == "__main__":
    main()
