"""Two choices of Burda-faithful training, measured on a short run: initialisation and loss scale.

Usage: python bench/burda_choices.py [--k 5] [--epochs 2] [--train-size 60000] [--seeds 0]
                                      [--eval-size 1000] [--eval-k 1000]
                                      [--inits torch burda] [--reductions mean sum]

Trains, with batch 20 and Adam (eps 1e-4, lr 1e-3), each combination of
  init       `torch` (PyTorch's default nn.Linear init) or `burda` (the authors' code: Glorot
             uniform, zero biases, output bias = logit of the mean training pixel)
  reduction  the batch `mean` of the per-image bound (ours), or its `sum` (the authors' code)
and prints the training loss of the last 50 steps and the test IWAE bound and ELBO (nats per image,
`eval_size` test images binarized with the fixed test seed, k=`eval_k`).

The sum is run as the mean with Adam's eps divided by the batch size: Adam's update
m / (sqrt(v) + eps) with every gradient scaled by c equals the unscaled update with eps / c,
so the two runs are the same arithmetic up to rounding, without a second code path.
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_args import add_data_dir_argument

from models import training
from models.config import TrainConfig
from models.data import binarized_test_images, load_mnist
from models.estimators import log_likelihood
from models.progress import Progress

BATCH = 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=60_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--eval-k", type=int, default=1000)
    parser.add_argument(
        "--inits", nargs="+", choices=("torch", "burda"), default=["torch", "burda"]
    )
    parser.add_argument("--reductions", nargs="+", choices=("mean", "sum"), default=["mean", "sum"])
    add_data_dir_argument(parser)
    args = parser.parse_args()

    data = load_mnist(args.data_dir)
    test_x = binarized_test_images(data.test_images[: args.eval_size])
    eps = training.ADAM_EPS
    for seed in args.seeds:
        for init in args.inits:
            for reduction in args.reductions:
                adam_eps = eps if reduction == "mean" else eps / BATCH
                config = TrainConfig(
                    k=args.k,
                    epochs=args.epochs,
                    batch_size=BATCH,
                    train_size=args.train_size,
                    eval_size=0,
                    seed=seed,
                    device="cpu",
                    init=init,
                )
                losses: list[float] = []

                def on_step(p: Progress, losses: list[float] = losses) -> None:
                    if p.done == p.total and p.loss is not None:
                        losses.append(p.loss)

                training.ADAM_EPS = adam_eps
                try:
                    result = training.train(config, data.train_images, callbacks=[on_step])
                finally:
                    training.ADAM_EPS = eps
                generator = torch.Generator().manual_seed(seed)
                estimate = log_likelihood(result.model, test_x, args.eval_k, generator=generator)
                print(
                    json.dumps(
                        {
                            "init": init,
                            "reduction": reduction,
                            "seed": seed,
                            "k": args.k,
                            "epochs": args.epochs,
                            "train_loss_last_50_steps": round(losses[-1], 3),
                            "test_iwae_bound": round(float(estimate.log_px.mean()), 3),
                            "test_elbo": round(float(estimate.elbo.mean()), 3),
                            "train_seconds": round(result.train_seconds, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
