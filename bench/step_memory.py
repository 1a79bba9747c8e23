"""Memory of one training step against its importance samples (k * m * batch_size).

Usage: python bench/step_memory.py [--objective iwae] [--layers 1] [--samples 50000 100000]

Each measurement runs in a fresh process: the peak resident memory of one forward and
backward pass of `--objective` on a Burda-sized model (random weights, random binary
images), minus the process's peak before the step, divided by the samples the step draws.
This is what `IWAE_MAX_SAMPLES_PER_STEP` bounds.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

from models.config import ModelConfig, TrainConfig
from models.cost import train_cost
from models.networks import IWAEModel
from models.objectives import backward, surrogates

BATCH = 100


def measure(config: TrainConfig) -> dict[str, float]:
    torch.manual_seed(0)
    model = IWAEModel(config.model)
    x = torch.bernoulli(torch.full((config.batch_size, config.model.x_dim), 0.2))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    backward(model, surrogates(model, x, config))
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    samples = train_cost(config).samples_per_step
    return {
        "samples_per_step": samples,
        "peak_mib": grown / 2**20,
        "bytes_per_sample": grown / samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="iwae")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--samples", type=int, nargs="+", default=[50_000, 100_000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        config = TrainConfig(
            k=args.child // BATCH,
            objective=args.objective,
            batch_size=BATCH,
            model=ModelConfig(layers=args.layers),
            device="cpu",
        )
        print(json.dumps(measure(config)))
        return
    print(f"{args.objective}, {args.layers} stochastic layer(s), batch {BATCH}, CPU, fp32")
    for samples in args.samples:
        command = [sys.executable, __file__, "--child", str(samples)]
        command += ["--objective", args.objective, "--layers", str(args.layers)]
        row = json.loads(subprocess.run(command, capture_output=True, check=True, text=True).stdout)
        print(
            f"k*batch = {row['samples_per_step']:>9,}: peak +{row['peak_mib']:7.0f} MiB, "
            f"{row['bytes_per_sample']:,.0f} bytes per sample"
        )


if __name__ == "__main__":
    main()
