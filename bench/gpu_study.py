"""The seed's whole K study in one GPU run: every cell trained stacked, scored, timed, reported.

Usage, from the repository root on a machine with a GPU and MNIST's files in $IWAE_DATA_DIR:
    python3 bench/gpu_study.py --out OUT
        [--ks 1 5 20 30 50 100] [--objectives vae iwae] [--seeds 0 1 2] [--epochs 100]
        [--budget-s 480] [--precision fp32] [--eval-k 5000] [--eval-size 2000] [--parallel 1]
        [--curve-every 5] [--curve-size 1000] [--curve-k 100]
        [--sweep-train-ks 5 50] [--sweep-ks 1 10 100 1000] [--sweep-draws 500] [--sweep-images 2]
and, to try the script itself on a CPU in a minute: python3 bench/gpu_study.py --out OUT --tiny

What one run does, within `--budget-s` seconds from its start:
1. Timing (kept in OUT/timing.json and reused by a later run unless --retime): one whole
   epoch of each stacked group of the grid (`models.stacked.stack_groups`: the cells of one
   K, every objective and seed, as the study trains them), and of one cell of each K alone
   (`models.training.train`, eager); on a GPU also alone as CUDA graphs in fp32 and with TF32
   products, for the seed's claim that a K=100 epoch costs ~30% more than a K=1 epoch (the
   ratio is printed and kept). Each is timed after an untimed warm-up epoch of 10 steps.
2. The plan: from those costs, how many epochs of the whole grid fit in what is left of the
   budget once the evaluation is set aside (measured too: one cell scored on a few images).
3. The study (`models.study.local.run_study`, Burda's one-layer network and init, batch 100,
   `--schedule`; with `--parallel N`, N processes at once, each the seeds of one (K,
   objective) or the cells of one K, each stopping at the same wall-clock deadline), with a
   learning curve per cell (`models.curve`): cells resume from their checkpoints in
   OUT/cells/, so a run stopped by the budget (at the last epoch end of each cell) is
   continued by running the same command again. Each finished cell is scored on
   `--eval-size` test images at k=`--eval-k` (bound, ELBO, active units), its gradient SNR
   at the trained parameters is measured from `--snr-draws` draws (`models.run`), and the
   cells trained at `--sweep-train-ks` get an SNR sweep at fixed parameters
   (`models.snr.snr_sweep`, OUT/snr_sweep.json).
4. OUT/results.json, report.html, figures/*.png and study.md (`models.study.local
   .write_study`), one 8x8 grid of samples per finished cell in OUT/samples/<cell>.png, and
   OUT/gpu_study.md: the machine, the timing table and the plan.

Nothing here is estimated: every figure is measured in this run, or in the run that wrote
timing.json, whose machine is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from bench_args import add_data_dir_argument
from PIL import Image
from roofline import timed

from models.checkpoint import load_model
from models.config import MIN_SNR_DRAWS, ModelConfig, Schedule, TrainConfig
from models.curve import CurveSpec
from models.data import Mnist, binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.networks import IWAEModel
from models.snr import gradient_snr, pool_sweeps, snr_sweep
from models.stacked import stack_groups, train_stacked
from models.study.grid import Cell, cell_config, expand_grid
from models.study.local import cell_dir, run_study, study_outcomes, write_study
from models.study.report import FIGURES_DIR, snr_sweep_figure, write_figure
from models.training import resolve_device, train

SEED_KS = (1, 5, 20, 30, 50, 100)
SWEEP_NAME = "snr_sweep.json"
WARMUP_STEPS = 10
# Test images scored to measure the evaluation's cost per image before the study.
EVAL_PROBE_IMAGES = 20
# The evaluation, imputation and SNR of a cell cost about this many times its bound alone
# (imputation scores the images again at K=1 and the cell's K; the SNR is small beside them).
EVAL_OVERHEAD = 1.5
SAMPLES_SIDE = 8
# --tiny's defaults: the whole script on a CPU in well under a minute.
TINY = {
    "ks": [1, 5],
    "seeds": [0, 1],
    "epochs": 2,
    "train_size": 200,
    "eval_k": 50,
    "eval_size": 20,
    "snr_draws": 16,
    "device": "cpu",
    "curve_every": 1,
    "curve_size": 10,
    "curve_k": 5,
    "sweep_train_ks": [5],
    "sweep_ks": [1, 10],
    "sweep_draws": 16,
    "sweep_images": 1,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the study's files")
    parser.add_argument("--ks", type=int, nargs="+", default=list(SEED_KS))
    parser.add_argument("--objectives", nargs="+", default=["vae", "iwae"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=100, help="epochs of every cell")
    parser.add_argument("--schedule", choices=get_args(Schedule), default="burda")
    parser.add_argument("--budget-s", type=float, default=480.0, help="this run's seconds")
    parser.add_argument("--precision", choices=["fp32", "tf32"], default="fp32")
    parser.add_argument("--eval-k", type=int, default=5000)
    parser.add_argument("--eval-size", type=int, default=2000)
    parser.add_argument("--snr-draws", type=int, default=200)
    parser.add_argument("--train-size", type=int, default=None, help="default: all 60,000")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--retime", action="store_true", help="time again: ignore timing.json")
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="processes training at once, each the seeds of one (K, objective), or the cells "
        "of one K when the kinds outnumber the processes: on a GPU, launch-bound groups fill "
        "each other's gaps",
    )
    parser.add_argument("--curve-every", type=int, default=5, help="0: no learning curve")
    parser.add_argument("--curve-size", type=int, default=1000)
    parser.add_argument("--curve-k", type=int, default=100)
    parser.add_argument(
        "--sweep-train-ks",
        type=int,
        nargs="*",
        default=[5, 50],
        help="the trained K whose cells get an SNR sweep at fixed parameters",
    )
    parser.add_argument("--sweep-ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--sweep-draws", type=int, default=500)
    parser.add_argument("--sweep-images", type=int, default=2)
    # A part's process: the cells named, trained until the wall-clock time given.
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="the script itself on a CPU: K 1 and 5, 2 seeds, 2 epochs of 200 images, "
        "20 test images at k=50 (every option given explicitly still wins)",
    )
    add_data_dir_argument(parser)
    if parser.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**TINY)
    return parser.parse_args(argv)


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The options every cell shares (the grid sets objective, K and seed)."""
    return TrainConfig(
        epochs=args.epochs,
        schedule=args.schedule,
        model=ModelConfig(),
        train_size=args.train_size,
        eval_size=args.eval_size,
        eval_k=args.eval_k,
        device=args.device,
        precision=args.precision,
        snr_draws=args.snr_draws,
    )


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _one_epoch(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, epochs=1, eval_size=0, snr_draws=0)


def _warm_and_time(configs: list[TrainConfig], images: torch.Tensor, device: torch.device) -> float:
    """Seconds of one whole epoch of `configs` trained together (one config: `train`, the
    solo trainer), after an untimed epoch of `WARMUP_STEPS` steps."""
    size = min(len(images), WARMUP_STEPS * configs[0].batch_size)
    warm = [dataclasses.replace(c, train_size=size) for c in configs]
    warm_images = images[:size]

    def run(group: list[TrainConfig], x: torch.Tensor) -> None:
        if len(group) == 1:
            train(group[0], x)
        else:
            train_stacked(group, x)

    run(warm, warm_images)
    return timed(lambda: run(configs, images), device)[0]


def time_epochs(
    base: TrainConfig, cells: list, data: Mnist, device: torch.device
) -> dict[str, Any]:
    """Seconds per epoch of each stacked group of the grid, and of one cell of each K alone
    (eager; on a GPU also CUDA-graphed in fp32 and TF32), and the evaluation's seconds per
    test image at `eval_k`."""
    configs = [_one_epoch(cell_config(base, cell)) for cell in cells]
    images = data.train_images[: base.train_size]
    groups = []
    for group in stack_groups(configs):
        members = [configs[i] for i in group]
        seconds = _warm_and_time(members, images, device)
        groups.append(
            {
                "k": members[0].k,
                "cells": [cells[i].name for i in group],
                "seconds_per_epoch": seconds,
                "seconds_per_epoch_per_cell": seconds / len(members),
            }
        )
    variants: dict[str, dict[str, Any]] = {"eager": {}}
    if device.type == "cuda":
        variants |= {
            "graph-fp32": {"cuda_graphs": True, "precision": "fp32"},
            "graph-tf32": {"cuda_graphs": True, "precision": "tf32"},
        }
    alone: dict[str, dict[int, float]] = {name: {} for name in variants}
    for k in sorted({cell.k for cell in cells}):
        first = next(c for c in configs if c.k == k)
        for name, change in variants.items():
            config = dataclasses.replace(first, **change)
            alone[name][k] = _warm_and_time([config], images, device)
    return {
        "groups": groups,
        "alone_seconds_per_epoch": alone,
        "eval_seconds_per_image": _eval_seconds_per_image(configs[0], data, device),
    }


def sweep_seconds_per_draw(
    config: TrainConfig, ks: Sequence[int], data: Mnist, device: torch.device
) -> dict[int, float]:
    """Seconds of one gradient draw of an untrained model on one image at each K."""
    model = IWAEModel(config.model).to(device)
    x = binarized_test_images(data.test_images[:1]).to(device)
    seconds = {}
    for k in ks:
        draws = functools.partial(
            gradient_snr, model, x, config.with_changes(k=k), draws=MIN_SNR_DRAWS
        )
        draws()  # warm-up
        seconds[k] = timed(draws, device)[0] / MIN_SNR_DRAWS
    return seconds


def _eval_seconds_per_image(config: TrainConfig, data: Mnist, device: torch.device) -> float:
    """The bound at `eval_k` of an untrained model on `EVAL_PROBE_IMAGES` images (its cost
    does not depend on the weights)."""
    model = IWAEModel(config.model).to(device)
    x = binarized_test_images(data.test_images[:EVAL_PROBE_IMAGES]).to(device)
    log_likelihood(model, x[:1], config.eval_k)  # warm-up
    seconds = timed(lambda: log_likelihood(model, x, config.eval_k), device)[0]
    return seconds / EVAL_PROBE_IMAGES


def k_ratios(alone: dict[str, dict[int, float]]) -> dict[str, float]:
    """Per variant, seconds per epoch at the largest K over those at the smallest."""
    return {
        name: by_k[max(by_k)] / by_k[min(by_k)] for name, by_k in alone.items() if len(by_k) > 1
    }


def plan(
    timing: dict[str, Any], cells: int, eval_size: int, sweep_s: float, seconds_left: float
) -> dict:
    """Epochs of the whole grid that fit in `seconds_left` once every cell's evaluation and
    the SNR sweeps (`sweep_s`) are set aside."""
    epoch_s = sum(g["seconds_per_epoch"] for g in timing["groups"])
    eval_s = EVAL_OVERHEAD * timing["eval_seconds_per_image"] * eval_size * cells + sweep_s
    return {
        "grid_seconds_per_epoch": epoch_s,
        "evaluation_seconds": eval_s,
        "seconds_left": seconds_left,
        "epochs_that_fit": max(0, int((seconds_left - eval_s) // epoch_s)),
    }


def save_samples(outcomes: Sequence[Any], out: Path) -> None:
    """An 8x8 grid of Bernoulli means per finished cell, OUT/samples/<cell>.png."""
    folder = out / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for outcome in outcomes:
        if outcome.status != "succeeded":
            continue
        model, _ = load_model(outcome.checkpoint, "cpu")
        with torch.inference_mode():
            digits = model.sample(SAMPLES_SIDE**2, torch.Generator().manual_seed(0))  # [64, D]
        side = SAMPLES_SIDE * 28
        grid = digits.reshape(SAMPLES_SIDE, SAMPLES_SIDE, 28, 28).transpose(1, 2)
        pixels = (255 * (1 - grid.reshape(side, side).float().numpy())).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{outcome.cell.name}.png")


def summary_markdown(info: dict, timing: dict, planned: dict, results: dict, command: str) -> str:
    lines = [
        "# GPU study: timing and plan",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {json.dumps(info)}",
        "",
        "| group | K | cells | s / epoch | s / epoch / cell |",
        "| --- | --- | --- | --- | --- |",
    ]
    for n, g in enumerate(timing["groups"]):
        lines.append(
            f"| {n} | {g['k']} | {len(g['cells'])} | {g['seconds_per_epoch']:.3f} "
            f"| {g['seconds_per_epoch_per_cell']:.3f} |"
        )
    lines += ["", "| one cell alone | " + " | ".join(f"K={k}" for k in _ks(timing)) + " |"]
    lines.append("| --- |" + " --- |" * len(_ks(timing)))
    for name, by_k in timing["alone_seconds_per_epoch"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by_k[k]:.3f}" for k in _ks(timing)) + " |")
    lines += [
        "",
        "Epoch at the largest K over the smallest, one cell alone: "
        + ", ".join(f"{n} {r:.2f}x" for n, r in timing["k_ratios"].items()),
        "",
        f"Plan: {json.dumps(planned)}",
        "",
        f"Study status: {results['status']}; cells: "
        + ", ".join(f"{c['name']} {c['status']}" for c in results["cells"]),
    ]
    return "\n".join(lines) + "\n"


def _ks(timing: dict) -> list[int]:
    return sorted(next(iter(timing["alone_seconds_per_epoch"].values())))


def curve_spec(args: argparse.Namespace) -> CurveSpec | None:
    if args.curve_every <= 0:
        return None
    return CurveSpec(every=args.curve_every, size=args.curve_size, k=args.curve_k)


def parts(cells: Sequence[Cell], parallel: int) -> list[list[Cell]]:
    """The cells one process trains: all of them (`parallel` 1); else the seeds of each
    (K, objective), or the cells of each K when those are more than `parallel` (parts
    beyond `parallel` would wait, and meet the deadline untrained); the largest K first."""
    if parallel <= 1:
        return [list(cells)]
    by_kind: dict[tuple[int, str], list[Cell]] = {}
    for cell in cells:
        by_kind.setdefault((cell.k, cell.objective), []).append(cell)
    if len(by_kind) > parallel:
        by_kind = {}
        for cell in cells:
            by_kind.setdefault((cell.k, ""), []).append(cell)
    return sorted(by_kind.values(), key=lambda part: -part[0].k)


def train_part(
    args: argparse.Namespace, base: TrainConfig, cells: Sequence[Cell], data: Mnist
) -> None:
    """Train and evaluate `cells` (stacked, resuming from OUT/cells), stopping training at
    the wall-clock `args.deadline`, then sweep the SNR of the finished cells at the trained
    K of `--sweep-train-ks`."""

    def out_of_time(progress: Any) -> bool:
        return progress.phase == "train" and time.time() > args.deadline

    outcomes = run_study(base, cells, data, args.out, [out_of_time], curve_spec(args))
    for outcome in outcomes:
        if outcome.status == "succeeded" and outcome.cell.k in args.sweep_train_ks:
            sweep_cell(args, outcome, data)


def sweep_cell(args: argparse.Namespace, outcome: Any, data: Mnist) -> None:
    """OUT/cells/<cell>/snr_sweep.json: `models.snr.snr_sweep` at the cell's trained
    parameters, on the first `--sweep-images` test images (skipped when it exists)."""
    path = cell_dir(args.out, outcome.cell) / SWEEP_NAME
    if path.is_file():
        return
    device = resolve_device(args.device)
    model, config = load_model(outcome.checkpoint, device)
    x = binarized_test_images(data.test_images[: args.sweep_images]).to(device)
    generator = torch.Generator(device).manual_seed(config.seed)
    sweep = snr_sweep(model, x, config, args.sweep_ks, draws=args.sweep_draws, generator=generator)
    path.write_text(json.dumps(sweep.to_dict(), indent=1))


def train_in_parallel(args: argparse.Namespace, argv: Sequence[str], cells: Sequence[Cell]) -> None:
    """Each of `parts` in its own process, `--parallel` at a time."""
    todo = parts(cells, args.parallel)
    running: list[subprocess.Popen] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            names = ",".join(cell.name for cell in todo.pop(0))
            command = [sys.executable, __file__, *argv, "--part", names]
            running.append(subprocess.Popen([*command, "--deadline", str(args.deadline)]))
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            running.remove(process)
            if process.returncode:
                print(f"part {process.args[-3]} exited with {process.returncode}", flush=True)


def pooled_sweeps(outcomes: Sequence[Any], out: Path) -> list[dict[str, Any]]:
    """Per (objective, trained K) with sweeps: `models.snr.pool_sweeps` over its seeds."""
    by_kind: dict[tuple[str, int], list[dict]] = {}
    for outcome in outcomes:
        path = cell_dir(out, outcome.cell) / SWEEP_NAME
        if outcome.status == "succeeded" and path.is_file():
            kind = (outcome.cell.objective, outcome.cell.k)
            by_kind.setdefault(kind, []).append(json.loads(path.read_text()))
    return [
        {"objective": objective, "train_k": k, **pool_sweeps(sweeps)}
        for (objective, k), sweeps in by_kind.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_mnist(args.data_dir)
    base = base_config(args)
    cells = expand_grid(args.ks, args.objectives, args.seeds, max_cells=None)
    if args.part is not None:
        names = set(args.part.split(","))
        train_part(args, base, [c for c in cells if c.name in names], data)
        return 0
    info = machine(device)
    print(f"{len(cells)} cells on {info}", flush=True)

    timing_path = args.out / "timing.json"
    if timing_path.is_file() and not args.retime:
        timing = json.loads(timing_path.read_text())
        timing["alone_seconds_per_epoch"] = {
            name: {int(k): s for k, s in by_k.items()}
            for name, by_k in timing["alone_seconds_per_epoch"].items()
        }
        print(f"timing from {timing_path} (measured on {timing['machine']})", flush=True)
    else:
        timing = time_epochs(base, cells, data, device) | {"machine": info}
        timing["k_ratios"] = k_ratios(timing["alone_seconds_per_epoch"])
        timing_path.write_text(json.dumps(timing, indent=2))
    sweep_s = 0.0
    sweep_cells = [c for c in cells if c.k in args.sweep_train_ks]
    if sweep_cells:
        per_draw = sweep_seconds_per_draw(base, args.sweep_ks, data, device)
        # Sweeps of different parts run at once: the cost of the largest part's.
        largest = max(len(p) for p in parts(sweep_cells, args.parallel))
        sweep_s = sum(per_draw.values()) * args.sweep_draws * args.sweep_images * largest
    seconds_left = args.budget_s - (time.monotonic() - started)
    planned = plan(timing, len(cells), args.eval_size, sweep_s, seconds_left)
    print(f"plan: {planned}", flush=True)

    # Training stops here, leaving the time the evaluations were measured to need.
    args.deadline = time.time() + planned["seconds_left"] - planned["evaluation_seconds"]
    if args.parallel > 1:
        train_in_parallel(args, argv, cells)
    else:
        train_part(args, base, cells, data)
    outcomes = study_outcomes(base, cells, args.out)
    results = write_study(base, outcomes, data, args.out)
    sweeps = pooled_sweeps(outcomes, args.out)
    (args.out / SWEEP_NAME).write_text(json.dumps(sweeps, indent=2))
    write_figure(snr_sweep_figure(sweeps), args.out / FIGURES_DIR / "snr_sweep.png")
    save_samples(outcomes, args.out)
    command = "python3 bench/gpu_study.py " + " ".join(argv)
    (args.out / "gpu_study.md").write_text(
        summary_markdown(info, timing, planned, results, command)
    )
    unfinished = [o.cell.name for o in outcomes if o.status != "succeeded"]
    print((args.out / "gpu_study.md").read_text())
    if unfinished:
        print(f"out of time: {len(unfinished)} cells to go; run the same command to go on")
    print(f"{time.monotonic() - started:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
