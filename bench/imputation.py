"""Imputation of held-out digits by trained models, at several K (docs/results.md, "Imputation").

Usage: python bench/imputation.py RUN_DIR... [--ks 1 5 100 1000] [--eval-size 1000]
                                  [--picture docs/images/imputation.png]

For each run folder written by `iwae train` (model.safetensors), scores the single imputation
of the top halves of the first `--eval-size` test digits (`models.imputation`, the metric of
job metrics, at more K) against mean and zero imputation, and prints a Markdown table. With
`--picture`, draws for the first run: per test digit, the input with its top half missing,
the single imputation at the largest K, three SIR draws and the true digit.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
from bench_args import add_data_dir_argument
from PIL import Image

from app.images import encode_png_grid
from models.checkpoint import load_model
from models.data import binarized_test_images, load_mnist
from models.imputation import imputation_metrics, impute
from models.missing import eval_observed
from models.run import CHECKPOINT_NAME

PICTURE_DIGITS = (0, 1, 2, 3, 4, 7)  # test images 0..: a 7, a 2, a 1, a 0, a 4 and a 9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5, 100, 1000])
    parser.add_argument("--eval-size", type=int, default=1000)
    add_data_dir_argument(parser)
    parser.add_argument("--picture", type=Path, default=None)
    args = parser.parse_args()

    data = load_mnist(args.data_dir)
    test_x = binarized_test_images(data.test_images[: args.eval_size])
    print(
        "| run | missing_rate, pattern | K train | zero | mean | "
        + " | ".join(f"K={k}" for k in args.ks)
        + " |"
    )
    print("|---|---|---:|---:|---:|" + "---:|" * len(args.ks))
    for run in args.runs:
        model, config = load_model(run / CHECKPOINT_NAME)
        pixel_mean = data.train_images[: config.train_size].mean(0)
        metrics = imputation_metrics(
            model, test_x, pixel_mean, args.ks, generator=torch.Generator().manual_seed(0)
        )
        cells = [metrics["zero"], metrics["mean"], *(metrics["model"][str(k)] for k in args.ks)]
        print(
            f"| {run.name} | {config.missing_rate}, {config.missing_pattern} | {config.k} | "
            + " | ".join(f"{c['bce']:.4f} / {c['accuracy']:.4f}" for c in cells)
            + " |"
        )
    if args.picture is not None:
        model, _ = load_model(args.runs[0] / CHECKPOINT_NAME)
        _picture(model, test_x[list(PICTURE_DIGITS)], max(args.ks), args.picture)
        print(f"wrote {args.picture}")


def _picture(model, x: torch.Tensor, k: int, path: Path) -> None:
    """One row per digit: input (missing grey), single imputation, 3 draws, the truth."""
    observed = eval_observed(*x.shape)
    result = impute(model, x, observed, k, 3, torch.Generator().manual_seed(0))
    rows = []
    for i in range(len(x)):
        shown = torch.where(observed[i].bool(), x[i], torch.full_like(x[i], 0.5))
        rows += [shown, result.single[i], *result.draws[:, i], x[i]]
    grid = encode_png_grid(torch.stack(rows).numpy(), cols=6)
    image = Image.open(io.BytesIO(grid))
    # Twice the size, nearest neighbour, so that pixels stay sharp in docs/results.md.
    image.resize((image.width * 2, image.height * 2), Image.Resampling.NEAREST).save(path)


if __name__ == "__main__":
    main()
