"""Command-line options every benchmark script shares."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# The checkout's sibling ../shared holds MNIST on the project's own machines.
_SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist"


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    """`--data-dir`: MNIST's folder, by default $IWAE_DATA_DIR or ../shared/data/mnist."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("IWAE_DATA_DIR", _SHARED_MNIST)),
        help="folder of the four MNIST files (default: $IWAE_DATA_DIR or ../shared/data/mnist)",
    )
