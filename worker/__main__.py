"""`python -m worker [--loglevel=info]`: a training worker configured by the IWAE_* variables."""

from __future__ import annotations

import argparse

from worker.runner import run_worker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--loglevel", default="info", help="debug, info, warning or error")
    args = parser.parse_args(argv)
    run_worker(args.loglevel)


if __name__ == "__main__":
    main()
