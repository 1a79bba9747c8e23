"""The GPU check: the CUDA tests and the CUDA benchmarks in one run, within a time budget.

Usage, from the repository root on a machine with a GPU and MNIST's .gz files in $IWAE_DATA_DIR:
    OUT=out IWAE_DATA_DIR=.mnist python3 bench/gpu_check.py
and, to try the script itself on a CPU in a minute:
    python3 bench/gpu_check.py --device cpu --small

It imports nothing of the service's web stack (FastAPI, Celery, pydantic): each part is a
subprocess that imports only `models` and `bench`. Each part runs under its own timeout, and a
failing part does not stop the others. Every part's output goes to $OUT/<part>.log (the
benchmarks' rows also to $OUT/<part>.json); the console gets the tail of each log, then which
parts failed and one summary table.

Parts: the machine (nvidia-smi, torch); the CUDA tests (tests/models/test_cuda_graphs.py and
test_fastpath.py, conftest files above tests/models left out); `train_throughput.py` for K
in {1, 5, 50, 100}, eager (the reference, fp32, bf16) and then replayed as CUDA graphs in
another process (fp32, TF32 products, bf16; a failed capture cannot spoil the eager figures);
`roofline.py --device cuda` (each epoch against the time of its matrix products alone, fp32
with the evaluation, then TF32); `step_profile.py` (host launch time against device time,
the costliest kernels). About three minutes on an H200.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Seconds for the whole check: the device is lent for minutes, start-up included.
BUDGET_S = 300
# The CUDA tests, and the fast path against the reference (its last test runs on the GPU).
CUDA_TESTS = ["tests/models/test_cuda_graphs.py", "tests/models/test_fastpath.py"]
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
TORCH_INFO = (
    "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
    "'available', torch.cuda.is_available()); "
    "torch.cuda.is_available() and print(torch.cuda.get_device_name(), "
    "torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')"
)


@dataclass
class Part:
    name: str
    argv: list[str]
    timeout_s: int
    needs_gpu: bool = False
    env: dict[str, str] = field(default_factory=dict)
    tail: int = 12  # lines of the log shown on the console


def parts(args: argparse.Namespace, out: Path) -> list[Part]:
    ks = ["1", "5"] if args.small else ["1", "5", "50", "100"]
    small = ["--train-size", "2000", "--eval-size", "50", "--eval-k", "50"] if args.small else []
    small_roofline = [
        "--train-size",
        "2000",
        "--eval-images",
        "10",
        "--eval-k",
        "50",
        "--repeats",
        "1",
    ]

    def roofline(name: str, *options: str) -> list[str]:
        script = [PYTHON, "bench/roofline.py", "--device", args.device, "--ks", *ks]
        sizes = small_roofline if args.small else []
        return [*script, *sizes, *options, "--json", f"{out}/{name}.json"]

    def throughput(name: str, *runs: str) -> list[str]:
        script = [PYTHON, "bench/train_throughput.py", "--device", args.device, "--ks", *ks]
        return [*script, *small, "--runs", *runs, "--json", f"{out}/{name}.json"]

    pytest = [PYTHON, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    profile = [PYTHON, "bench/step_profile.py", "--device", args.device, "--ks", *ks]
    return [
        Part("nvidia-smi", ["nvidia-smi", "-L"], 20, needs_gpu=True),
        Part("torch", [PYTHON, "-c", TORCH_INFO], 60),
        # cuBLAS picks the same kernels on every stream with a fixed workspace (eager steps and
        # captures run on different streams), as torch.use_deterministic_algorithms asks.
        Part("tests", [*pytest, "--confcutdir=tests/models", *CUDA_TESTS], 180, env=DETERMINISTIC),
        Part("eager", throughput("eager", "ref", "ours", "ours-bf16"), 180),
        Part(
            "graphs",
            throughput("graphs", "ours-graph", "ours-tf32-graph", "ours-bf16-graph"),
            120,
            needs_gpu=True,
        ),
        Part("roofline", roofline("roofline"), 120),
        Part(
            "roofline-tf32",
            roofline(
                "roofline-tf32", "--precision", "tf32", "--skip-reference", "--eval-images", "0"
            ),
            60,
            needs_gpu=True,
        ),
        Part("profile", [*profile, "--steps", "20" if args.small else "200"], 90, tail=26),
    ]


def run(part: Part, out: Path, deadline: float) -> str:
    """Runs `part` into out/<name>.log; returns "ok", "failed (...)" or "skipped (...)"."""
    left = deadline - time.monotonic()
    if left < 10:
        return "skipped (no time left)"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, **part.env}
    if "IWAE_DATA_DIR" in env:  # the parts run in the repository root
        env["IWAE_DATA_DIR"] = str(Path(env["IWAE_DATA_DIR"]).resolve())
    log = out / f"{part.name}.log"
    start = time.monotonic()
    try:
        with log.open("w") as file:
            done = subprocess.run(
                part.argv,
                cwd=ROOT,
                env=env,
                stdout=file,
                stderr=subprocess.STDOUT,
                timeout=min(part.timeout_s, left),
            )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"failed (timed out after {min(part.timeout_s, left):.0f} s)"
    except OSError as error:
        status = f"failed ({error})"
    seconds = time.monotonic() - start
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    print(f"\n=== {part.name}: {status}, {seconds:.0f} s, log {log}")
    print("\n".join(lines[-part.tail :]), flush=True)
    return status


def summary(out: Path) -> list[str]:
    """Images/s per K and run, then the issue's two GPU goals, from the benchmarks' JSON;
    then the roofline's fractions."""
    return [*throughput_summary(out), *roofline_summary(out)]


def throughput_summary(out: Path) -> list[str]:
    rows, peaks, images = [], {}, 0
    for name in ("eager", "graphs"):
        path = out / f"{name}.json"
        if path.exists():
            data = json.loads(path.read_text())
            rows += data["rows"]
            peaks, images = data["peak_gflops"], data["images"]
    if not rows:
        return ["no benchmark figures (see the logs above)"]
    runs = list(dict.fromkeys(row["run"] for row in rows))
    ks = sorted({row["k"] for row in rows})
    table = {(row["k"], row["run"]): row for row in rows}
    lines = [
        f"images/s per epoch of {images} images (fraction of the measured GEMM rate: "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in peaks.items())
        + " GFLOP/s)",
        f"{'K':>4} " + " ".join(f"{run:>17}" for run in runs),
    ]
    for k in ks:
        cells = []
        for run in runs:
            row = table.get((k, run))
            cells.append(
                f"{row['images_per_s']:>9.0f} ({100 * row['peak_fraction']:>4.1f}%)"
                if row
                else f"{'-':>17}"
            )
        lines.append(f"{k:>4} " + " ".join(f"{cell:>17}" for cell in cells))
    lines.append("test bound after that epoch (fp32, nats per image; see eager.log)")
    for k in ks:
        bounds = [table.get((k, run), {}).get("test_bound", math.nan) for run in runs]
        lines.append(f"{k:>4} " + " ".join(f"{bound:>17.2f}" for bound in bounds))
    pairs = (("ours", "ours-graph"), ("ours-graph", "ours-tf32-graph"))
    for eager, graph in (*pairs, ("ours-bf16", "ours-bf16-graph")):
        pairs = [(table.get((k, eager)), table.get((k, graph))) for k in ks]
        gaps = [abs(a["test_bound"] - b["test_bound"]) for a, b in pairs if a and b]
        if gaps:
            lines.append(f"{graph:>17}: |test bound - {eager}'s| <= {max(gaps):.2g}")
    for run in runs:
        first, last = table.get((min(ks), run)), table.get((max(ks), run))
        at50 = table.get((50, run))
        goal = f"K={max(ks)} vs K={min(ks)}: " + (
            f"{100 * (last['seconds'] / first['seconds'] - 1):+.0f}% time"
            if first and last
            else "-"
        )
        if at50:
            goal += f"; K=50 epoch {at50['seconds']:.2f} s"
        lines.append(f"{run:>17}: {goal}")
    return lines


def roofline_summary(out: Path) -> list[str]:
    """Floor / epoch per K for each side and precision of the roofline parts' JSON."""
    columns, evaluation = {}, []
    for name in ("roofline", "roofline-tf32"):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        for row in data["train"]:
            column = f"{row['side']} {data['precision']}"
            columns.setdefault(column, {})[row["k"]] = row["floor_s"] / row["seconds"]
        evaluation += [
            f"{row['side']} {100 * row['floor_s'] / row['seconds']:.0f}% at k={row['k']} "
            f"({row['seconds']:.1f} s, floor {row['floor_s']:.2f} s)"
            for row in data["eval"]
        ]
    if not columns:
        return ["no roofline figures (see its log above)"]
    ks = sorted({k for fractions in columns.values() for k in fractions})
    lines = [
        "roofline: the epoch's matrix products alone at this machine's rate / the epoch "
        "(with CUDA graphs on a GPU; see roofline.log)",
        f"{'K':>4} " + " ".join(f"{column:>17}" for column in columns),
    ]
    for k in ks:
        cells = [fractions.get(k) for fractions in columns.values()]
        lines.append(
            f"{k:>4} "
            + " ".join(f"{'-':>17}" if c is None else f"{100 * c:>16.0f}%" for c in cells)
        )
    if evaluation:
        lines.append("evaluation of 10,000 test images, fp32: " + "; ".join(evaluation))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="tiny sizes, to try the script")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check")))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    statuses = {}
    for part in parts(args, out):
        if part.needs_gpu and args.device != "cuda":
            statuses[part.name] = "skipped (needs a GPU)"
            continue
        statuses[part.name] = run(part, out, deadline)
    lines = ["", "=== summary", *summary(out), ""]
    lines += [f"{name:>13}: {status}" for name, status in statuses.items()]
    failed = [name for name, status in statuses.items() if status.startswith("failed")]
    lines.append(f"failed parts: {', '.join(failed) or 'none'}; logs and JSON in {out}")
    print("\n".join(lines))
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
