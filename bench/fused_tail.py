"""The fast path's elementwise tail over the logits, eager against one fused kernel.

Usage: python bench/fused_tail.py [--ks 50] [--threads 2]

A training step of `models.fastpath` passes about seven times over the [K*B, 784] logits
after their product: the softplus sum (`_softplus_sums`: clamp and sum, abs, sigmoid,
products), then e = x - sigmoid(l) for the backward. `torch.compile` (Inductor's C++ code
on the CPU) fuses the same quantities into one loop over the logits, with one exp and one
log1p per pixel: softplus(l) = relu(l) + log1p(exp(-|l|)) and sigmoid(l) from the same
exp. Printed per K: the best of 5 of each (ms, wall at `--threads`), the ratio, the compile
time (shorter when Inductor's cache already holds the kernel), and the largest differences
of the two (the fused softplus sums round differently).
Not used by the trainer yet: this measures whether it would pay (README: a K=50 step spends
~9.5 ms of ~47 ms outside its products). Ratios within one run are what count.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
from torch import Tensor

from models.fastpath import _softplus_sums

BATCH, D = 100, 784


def eager_tail(logits: Tensor, x: Tensor, scratch: Tensor) -> tuple[Tensor, Tensor]:
    """What `FastPath._decode` does after the logits' product: softplus sums [R] and e in
    place of the logits [K, B, D]."""
    softplus = _softplus_sums(logits, scratch, None)
    e = torch.sigmoid(logits, out=logits).view(-1, *x.shape)
    return softplus, torch.sub(x, e, out=e)


def fused_tail(logits: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """The same quantities written for one fused loop: [R] and [K, B, D]."""
    t = torch.exp(-logits.abs())  # in (0, 1]
    softplus = (logits.clamp_min(0) + torch.log1p(t)).sum(-1)
    sigmoid = torch.where(logits >= 0, 1 / (1 + t), t / (1 + t))
    return softplus, x - sigmoid.view(-1, *x.shape)


def best_ms(fn, inputs: list[Tensor], x: Tensor) -> float:
    """Best of 5 rounds of calls on fresh copies of the logits (the eager tail overwrites
    them), in ms per call."""
    best = float("inf")
    for _ in range(5):
        copies = [t.clone() for t in inputs]
        start = time.perf_counter()
        for logits in copies:
            fn(logits, x)
        best = min(best, (time.perf_counter() - start) / len(copies))
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[50])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as training runs
    generator = torch.Generator().manual_seed(0)
    print(f"fp32, flush-to-zero on, {torch.get_num_threads()} threads; ms per call, best of 5")
    for k in args.ks:
        logits = 4 * torch.randn(k * BATCH, D, generator=generator)  # [R, D]
        x = torch.bernoulli(torch.full((BATCH, D), 0.3), generator=generator)  # [B, D]
        scratch = torch.empty_like(logits)
        start = time.perf_counter()
        compiled = torch.compile(fused_tail, dynamic=False)
        compiled(logits, x)
        compile_s = time.perf_counter() - start
        inputs = [logits] * 10
        eager = best_ms(functools.partial(eager_tail, scratch=scratch), inputs, x)
        fused = best_ms(compiled, inputs, x)
        want_softplus, want_e = eager_tail(logits.clone(), x, scratch)
        softplus, e = compiled(logits, x)
        print(
            f"K={k}: eager {eager:.2f}, fused {fused:.2f}, eager / fused {eager / fused:.2f}x, "
            f"compiled in {compile_s:.0f} s; largest differences: softplus sum "
            f"{(softplus - want_softplus).abs().max().item():.1e} nats, "
            f"e {(e - want_e).abs().max().item():.1e}"
        )


if __name__ == "__main__":
    main()
