"""Training throughput: our trainer against a plain PyTorch IWAE, whole epochs of MNIST.

Usage: python bench/train_throughput.py [--ks 1 5 50] [--train-size 60000] [--device cpu]
                                         [--data-dir ../shared/data/mnist] [--runs ref ours ...]
                                         [--json results.json]

For each K it times one full epoch (batch 100) of:
  ours        models.training.train, fp32 (it flushes subnormals to zero while training)
  ours-bf16   the same with --precision bf16, then the fp32 test bound of both models
  ref         the obvious implementation: nn.Sequential MLPs, BCE-with-logits over the
              K-times expanded batch, logsumexp, Adam; default float settings
  ref-ftz     the same reference with torch.set_flush_denormal(True) (CPU only: flushing
              subnormals is a CPU setting)
and, on a GPU, `ours-graph` and `ours-bf16-graph`: the same runs with cuda_graphs=True, and
`ours-tf32-graph`, fp32 with TF32 matrix products (--precision tf32), graphed. It prints
images/s, the ratio to `ref` (when it runs), and the fraction of the machine's matmul rate
(measured in this run: fp32 for fp32 rows, TF32 and bf16 for theirs on a GPU) that each
reaches; every test bound is computed in fp32. Whole epochs matter: at large K, subnormals
accumulate in the backward pass after a few hundred steps, so the first hundred steps
mislead. On a GPU every configuration first runs a short untimed epoch, so that kernel
loading and cuBLAS's first calls are not timed.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_args import add_data_dir_argument
from torch import nn

from models.config import ModelConfig, TrainConfig
from models.data import binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.training import resolve_device, tf32_matmuls, train

BATCH = 100
D, H, Z = 784, 200, 50
# Rows: the reference (with subnormals flushed: CPU only), ours, ours in bf16, and ours
# replayed as CUDA graphs (GPU only), also with TF32 products.
RUNS = ("ref", "ref-ftz", "ours", "ours-graph", "ours-tf32-graph", "ours-bf16", "ours-bf16-graph")


class ReferenceIWAE(nn.Module):
    """IWAE written the obvious way, as a user would before optimising anything."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, 2 * Z)
        )
        self.decoder = nn.Sequential(
            nn.Linear(Z, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, D)
        )

    def log_weights(self, x: torch.Tensor, k: int, generator=None) -> torch.Tensor:
        mu, logvar = self.encoder(x).chunk(2, -1)
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(k, *mu.shape, generator=generator, device=x.device)  # [K, B, Z]
        logits = self.decoder(z)  # [K, B, D]
        x_k = x.expand(k, *x.shape)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x_k, reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
        return log_px_z + log_pz - log_qz  # [K, B]


def reference_epoch(images: torch.Tensor, k: int, seed: int) -> tuple[float, ReferenceIWAE]:
    torch.manual_seed(seed)
    model = ReferenceIWAE().to(images.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    order = torch.randperm(len(images), device=images.device)
    start = time.perf_counter()
    for i in range(0, len(images), BATCH):
        x = torch.bernoulli(images[order[i : i + BATCH]])
        log_w = model.log_weights(x, k)
        loss = -(torch.logsumexp(log_w, 0) - math.log(k)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _synchronize(images.device)
    return time.perf_counter() - start, model


def ours_epoch(
    images: torch.Tensor, k: int, precision: str, device: str, seed: int, cuda_graphs: bool
):
    config = TrainConfig(
        k=k,
        epochs=1,
        batch_size=BATCH,
        device=device,
        precision=precision,
        cuda_graphs=cuda_graphs,
        seed=seed,
        model=ModelConfig(layers=1, latent_dim=Z, hidden_dim=H),
    )
    _synchronize(images.device)
    start = time.perf_counter()
    result = train(config, images)
    _synchronize(images.device)
    return time.perf_counter() - start, result.model


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best GEMM rate of this machine in `dtype`, measured now on square matrices (2048 on a
    CPU, 8192 on a GPU, where smaller ones leave it idle between launches)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(10):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def training_gflop_per_image(k: int) -> float:
    """Matmul FLOPs of one image's forward and backward pass (backward ~ 2x forward)."""
    encoder = D * H + H * H + H * 2 * Z
    decoder = Z * H + H * H + H * D
    return 3 * 2 * (encoder + k * decoder) / 1e9


def default_runs(gpu: bool) -> list[str]:
    """Every row that applies: `ref-ftz` on a CPU only, the graphed rows on a GPU only."""
    if gpu:
        return [run for run in RUNS if run != "ref-ftz"]
    return [run for run in RUNS if "graph" not in run]


def test_bound(model, test_x: torch.Tensor, k: int) -> float:
    generator = torch.Generator(test_x.device).manual_seed(0)
    return float(log_likelihood(model, test_x, k, generator=generator).log_px.mean())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50])
    parser.add_argument("--train-size", type=int, default=60_000)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    add_data_dir_argument(parser)
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--eval-k", type=int, default=1000)
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=RUNS,
        help="the rows to time (default: all that apply to the device)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    data = load_mnist(args.data_dir)
    images = data.train_images[: args.train_size].to(device)
    test_x = binarized_test_images(data.test_images[: args.eval_size]).to(device)
    peaks = {"fp32": matmul_peak_gflops(device)}
    # A CPU without bf16 units emulates it; its rows are measured against the fp32 rate.
    peaks["bf16"] = matmul_peak_gflops(device, torch.bfloat16) if gpu else peaks["fp32"]
    if gpu:
        with tf32_matmuls(True):
            peaks["tf32"] = matmul_peak_gflops(device)
    name = torch.cuda.get_device_name(device) if gpu else f"{torch.get_num_threads()} threads"
    print(
        f"device={device} ({name}) torch={torch.__version__} images/epoch={len(images)} "
        f"batch={BATCH} matmul rate: fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"bf16 {peaks['bf16']:.0f} GFLOP/s"
        + (
            f", tf32 {peaks['tf32']:.0f} GFLOP/s; fp32 matmul precision outside tf32 rows "
            f"{torch.get_float32_matmul_precision()!r}"
            if gpu
            else ""
        )
    )
    print(f"test bound: {args.eval_size} test images, k={args.eval_k}, fp32, nats per image")
    print(
        f"{'K':>3} {'run':<15} {'seconds':>8} {'img/s':>8} {'vs ref':>7} {'%peak':>6} "
        f"{'test bound':>11}"
    )
    runs = args.runs or default_runs(gpu)
    records = []
    for k in args.ks:
        rows = []
        for run in runs:
            precision = next((p for p in ("bf16", "tf32") if p in run), "fp32")
            if run.startswith("ref"):
                torch.set_flush_denormal(run == "ref-ftz")
                seconds, model = reference_epoch(images, k, seed=0)
                torch.set_flush_denormal(False)
            else:
                graphs = run.endswith("graph")
                if gpu:  # untimed: kernel loading, cuBLAS's first calls, the graph pool
                    ours_epoch(images[: 10 * BATCH], k, precision, args.device, 0, graphs)
                seconds, model = ours_epoch(images, k, precision, args.device, 0, graphs)
            rows.append((run, precision, seconds, model))
        ref_s = rows[0][2] if runs[0] == "ref" else math.nan
        for run, precision, seconds, model in rows:
            rate = len(images) / seconds
            gflops = rate * training_gflop_per_image(k)
            record = {
                "k": k,
                "run": run,
                "seconds": seconds,
                "images_per_s": rate,
                "vs_ref": ref_s / seconds,
                "peak_fraction": gflops / peaks[precision],
                "test_bound": test_bound(model, test_x, args.eval_k),
            }
            records.append(record)
            print(
                f"{k:>3} {run:<15} {seconds:>8.2f} {rate:>8.0f} {record['vs_ref']:>6.2f}x "
                f"{100 * record['peak_fraction']:>5.1f}% {record['test_bound']:>11.2f}"
            )
    if args.json is not None:
        header = {"device": str(device), "name": name, "torch": torch.__version__}
        summary = {**header, "images": len(images), "peak_gflops": peaks, "rows": records}
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
