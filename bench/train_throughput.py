"""Training throughput: our trainer against a plain PyTorch IWAE, whole epochs of MNIST.

Usage: python bench/train_throughput.py [--ks 1 5 50] [--train-size 60000] [--device cpu]
                                         [--data-dir ../shared/data/mnist] [--skip-bf16]

For each K it times one full epoch (batch 100) of:
  ours       models.training.train, fp32 (it flushes subnormals to zero while training)
  ours-bf16  the same with --precision bf16, then the fp32 test bound of both models
  ref        the obvious implementation: nn.Sequential MLPs, BCE-with-logits over the
             K-times expanded batch, logsumexp, Adam; default float settings
  ref-ftz    the same reference with torch.set_flush_denormal(True)
and prints images/s, ratios, and the fraction of the machine's fp32 matmul peak (measured in
this run) that each reaches. Whole epochs matter: at large K, subnormals accumulate in the
backward pass after a few hundred steps, so the first hundred steps mislead.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig, TrainConfig
from models.data import binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.training import resolve_device, train

BATCH = 100
D, H, Z = 784, 200, 50


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


def ours_epoch(images: torch.Tensor, k: int, precision: str, device: str, seed: int):
    config = TrainConfig(
        k=k,
        epochs=1,
        batch_size=BATCH,
        device=device,
        precision=precision,
        seed=seed,
        model=ModelConfig(layers=1, latent_dim=Z, hidden_dim=H),
    )
    start = time.perf_counter()
    result = train(config, images)
    _synchronize(images.device)
    return time.perf_counter() - start, result.model


def matmul_peak_gflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GEMM rate of this machine, measured now."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    best = math.inf
    for _ in range(repeats):
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
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(
            os.environ.get(
                "IWAE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared/data/mnist"
            )
        ),
    )
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--eval-k", type=int, default=1000)
    parser.add_argument("--skip-bf16", action="store_true")
    args = parser.parse_args()

    device = resolve_device(args.device)
    data = load_mnist(args.data_dir)
    images = data.train_images[: args.train_size].to(device)
    test_x = binarized_test_images(data.test_images[: args.eval_size]).to(device)
    peak = matmul_peak_gflops(device)
    print(
        f"device={device} threads={torch.get_num_threads()} images/epoch={len(images)} "
        f"batch={BATCH} fp32 matmul peak={peak:.1f} GFLOP/s"
    )
    print(f"test bound: {args.eval_size} test images, k={args.eval_k}, fp32, nats per image")
    header = (
        f"{'K':>3} {'run':<10} {'seconds':>8} {'img/s':>8} {'vs ref':>7} {'vs ftz':>7} "
        f"{'%peak':>6} {'test bound':>11}"
    )
    print(header)
    for k in args.ks:
        rows = []
        ref_s, ref_model = reference_epoch(images, k, seed=0)
        rows.append(("ref", ref_s, ref_model))
        torch.set_flush_denormal(True)
        ftz_s, ftz_model = reference_epoch(images, k, seed=0)
        torch.set_flush_denormal(False)
        rows.append(("ref-ftz", ftz_s, ftz_model))
        ours_s, ours_model = ours_epoch(images, k, "fp32", args.device, seed=0)
        rows.append(("ours", ours_s, ours_model))
        if not args.skip_bf16:
            bf_s, bf_model = ours_epoch(images, k, "bf16", args.device, seed=0)
            rows.append(("ours-bf16", bf_s, bf_model))
        for name, seconds, model in rows:
            rate = len(images) / seconds
            gflops = rate * training_gflop_per_image(k)
            bound = test_bound(model, test_x, args.eval_k)
            print(
                f"{k:>3} {name:<10} {seconds:>8.1f} {rate:>8.0f} {ref_s / seconds:>6.2f}x "
                f"{ftz_s / seconds:>6.2f}x {100 * gflops / peak:>5.1f}% {bound:>11.2f}"
            )


if __name__ == "__main__":
    main()
