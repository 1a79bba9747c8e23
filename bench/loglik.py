"""Speed of the k=5000 log-likelihood estimate: ours against the obvious PyTorch version.

Usage: python bench/loglik.py [--k 5000] [--repeats 5] [--device cpu]

Times `models.estimators.log_likelihood` for one image and for a batch of 100 against a
reference written the obvious way (K-times expanded batch, BCE-with-logits, logsumexp, one
image at a time so that its memory stays bounded), on the same randomly initialised Burda
1-layer model and the same binarized MNIST test images. Prints the best of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from bench_args import add_data_dir_argument

from models.config import ModelConfig
from models.data import binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.networks import IWAEModel
from models.training import resolve_device


@torch.no_grad()
def reference_log_likelihood(model: IWAEModel, x: torch.Tensor, k: int) -> torch.Tensor:
    """The obvious estimator: per image, all K samples at once through the same networks."""
    out = []
    for image in x:
        mu, logvar = model.encoders[0](image[None])
        std = torch.exp(0.5 * logvar)
        z = mu + std * torch.randn(k, *mu.shape[1:], device=x.device)  # [K, d]
        logits = model.decoders[0](z)  # [K, D]
        log_px_z = -F.binary_cross_entropy_with_logits(
            logits, image.expand(k, -1), reduction="none"
        ).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
        out.append(torch.logsumexp(log_px_z + log_pz - log_qz, 0) - math.log(k))
    return torch.stack(out)


def best_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    add_data_dir_argument(parser)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = IWAEModel(ModelConfig()).to(device).eval()
    test_x = binarized_test_images(load_mnist(args.data_dir).test_images[:100]).to(device)
    print(
        f"device={device} threads={torch.get_num_threads()} k={args.k} "
        f"best of {args.repeats}, seconds per call"
    )
    print(f"{'batch':>5} {'ours':>8} {'reference':>10} {'speed-up':>9}")
    for batch in (1, 100):
        x = test_x[:batch]
        ours = best_seconds(lambda x=x: log_likelihood(model, x, args.k), args.repeats, device)
        ref = best_seconds(
            lambda x=x: reference_log_likelihood(model, x, args.k), args.repeats, device
        )
        print(f"{batch:>5} {ours:>8.3f} {ref:>10.3f} {ref / ours:>8.2f}x")


if __name__ == "__main__":
    main()
