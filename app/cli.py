"""The `iwae` command: train and evaluate in the foreground, or run the service.

    iwae train --k 50 [--objective iwae] [--epochs 1] ...   train, evaluate, write a checkpoint
    iwae study --ks 1 5 50 [--objectives vae iwae] [...]    the K study: grid of runs, report
    iwae eval --model PATH [--k 5000] [--eval-size 10000]    score a checkpoint on MNIST test
    iwae snr --model PATH --ks 1 10 100 1000 [...]          gradient SNR against K (JSON)
    iwae impute --model PATH IMAGE [--mask MASK] [--out F]  fill in an image's missing pixels
    iwae serve [--host 127.0.0.1] [--port 8000]             the API (+ a local worker if embedded)
    iwae worker                                             a Celery worker (distributed mode)

Data comes from IWAE_DATA_DIR (default IWAE_HOME/data, downloaded there when missing).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.config import (
    DEFAULT_ALPHA,
    DEFAULT_ESS_TARGET,
    DEFAULT_K_MIN,
    K_SCHEDULES,
    MISSING_PATTERNS,
    OBJECTIVES,
    PRECISIONS,
    PRESETS,
    VR_OBJECTIVES,
    ModelConfig,
    TrainConfig,
    preset_config,
)
from models.data import DataError

if TYPE_CHECKING:
    from models.progress import Progress
    from models.study.grid import Cell

_TRAIN_DEFAULTS = TrainConfig()
# Gradient draws per study cell: enough for the bias-corrected median SNR of 20 images.
STUDY_SNR_DRAWS = 100


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iwae",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    train = commands.add_parser(
        "train",
        formatter_class=fmt,
        help="train a model in the foreground, then evaluate it on the test set",
    )
    train.add_argument("--k", type=int, required=True, help="importance samples per image")
    _add_training_arguments(train)
    train.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/<objective>-k<K>-<time>); an existing checkpoint "
        "there is resumed",
    )

    study = commands.add_parser(
        "study",
        formatter_class=fmt,
        help="the K study: train every (objective, K, seed), then write results.json, "
        "report.html, figures/*.png and study.md (test log-likelihood, active units, cost "
        "and gradient SNR against K); or --submit it to a running service",
    )
    study.add_argument("--ks", type=int, nargs="+", default=[1, 5, 50])
    study.add_argument("--objectives", choices=OBJECTIVES, nargs="+", default=["vae", "iwae"])
    study.add_argument("--seeds", type=int, nargs="+", default=[0])
    _add_training_arguments(study, per_cell=False)
    study.set_defaults(snr_draws=STUDY_SNR_DRAWS)
    study.add_argument(
        "--out",
        type=Path,
        default=Path("runs/study"),
        help="cells/<cell>/ per run (finished cells are reused, interrupted ones resumed), "
        "results.json, report.html, figures/ and study.md",
    )
    study.add_argument(
        "--submit",
        metavar="URL",
        default=None,
        help="POST the grid to the service at URL (e.g. http://host:8000) instead of running "
        "it here, and print the study id",
    )
    study.add_argument(
        "--token",
        default=None,
        help="with --submit: the service's API token (default: IWAE_API_TOKEN)",
    )

    evaluate = commands.add_parser(
        "eval", formatter_class=fmt, help="test log-likelihood and active units of a checkpoint"
    )
    evaluate.add_argument(
        "--model",
        type=Path,
        required=True,
        help="a model.safetensors file or the folder holding it",
    )
    _add_eval_arguments(evaluate, k_flag="--k", eval_size=10_000)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--seed", type=int, default=0)

    snr = commands.add_parser(
        "snr",
        formatter_class=fmt,
        help="signal-to-noise ratio of a checkpoint's encoder and decoder gradient estimators "
        "against K, one test image at a time (B=1, Rainforth et al. 2018); prints JSON",
    )
    snr.add_argument(
        "--model", type=Path, required=True, help="a model.safetensors file or its folder"
    )
    snr.add_argument("--ks", type=int, nargs="+", default=[1, 10, 100, 1000])
    snr.add_argument("--draws", type=int, default=1000, help="gradient draws per image and K")
    snr.add_argument(
        "--images", type=int, default=4, help="first N binarized test images, each alone"
    )
    snr.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help="gradient estimator (default: the one the model was trained with)",
    )
    snr.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    snr.add_argument("--seed", type=int, default=0)

    impute = commands.add_parser(
        "impute",
        formatter_class=fmt,
        help="fill in the missing pixels of an image with a checkpoint (as POST /impute): "
        "writes a PNG strip of the input, the mask, the single imputation and n draws",
    )
    impute.add_argument(
        "--model", type=Path, required=True, help="a model.safetensors file or its folder"
    )
    impute.add_argument("image", type=Path, help="an image of one digit, framed like MNIST")
    impute.add_argument(
        "--mask",
        type=Path,
        default=None,
        help="same size as IMAGE, white = missing; without it, IMAGE's transparent pixels",
    )
    impute.add_argument("--k", type=int, default=1000, help="importance samples")
    impute.add_argument("--n", type=int, default=8, help="multiple imputations to draw")
    impute.add_argument("--seed", type=int, default=0)
    impute.add_argument("--out", type=Path, default=Path("imputed.png"), help="the PNG strip")
    impute.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")

    serve = commands.add_parser(
        "serve",
        formatter_class=fmt,
        help="run the REST API; without IWAE_BROKER_URL also a local worker (embedded mode)",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    commands.add_parser("worker", help="run a Celery worker for IWAE_BROKER_URL")
    return parser


class _Given(argparse.Action):
    """Stores the value and records its name in `namespace.given`, so that values given on
    the command line override a preset while the defaults do not."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def _add_training_arguments(parser: argparse.ArgumentParser, per_cell: bool = True) -> None:
    """Options of a training run other than K (shared by `train` and `study`); without
    `per_cell`, also without the objective and the seed (a study's grid sets them)."""
    d = _TRAIN_DEFAULTS
    add = functools.partial(parser.add_argument, action=_Given)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="burda: Burda et al.'s training (batch 20, --init burda, --schedule burda, 3280 "
        "epochs, evaluation of all 10,000 test images at k=5000); options given "
        "explicitly override it",
    )
    if per_cell:
        add("--objective", choices=OBJECTIVES, default=d.objective)
    add("--m", type=int, default=d.m, help="groups of k samples for miwae/piwae")
    add("--beta", type=float, default=d.beta, help="ELBO weight of ciwae")
    add(
        "--alpha",
        type=float,
        default=None,
        help=f"VR-IWAE alpha in [0, 1) of vr-iwae and vr-iwae-dreg (default {DEFAULT_ALPHA})",
    )
    add(
        "--k-schedule",
        choices=K_SCHEDULES,
        default=d.k_schedule,
        help="K per epoch: fixed, linear (k-min to k), ess (steered by held-out ESS/K)",
    )
    add(
        "--k-min",
        type=int,
        default=None,
        help=f"smallest K of the linear and ess schedules (default {DEFAULT_K_MIN})",
    )
    add(
        "--ess-target",
        type=float,
        default=None,
        help=f"ESS/K target of the ess schedule (default {DEFAULT_ESS_TARGET})",
    )
    add("--epochs", type=int, default=d.epochs)
    add("--batch-size", type=int, default=d.batch_size)
    add(
        "--lr",
        type=float,
        default=d.learning_rate,
        help="Adam learning rate (the first stage's with --schedule burda)",
    )
    add(
        "--schedule",
        choices=("constant", "burda"),
        default=d.schedule,
        help="burda: 3^i epochs at lr * 10^(-i/7), i = 0..7 (3280 epochs)",
    )
    add(
        "--init",
        choices=("burda", "torch"),
        default=d.init,
        help="burda: Glorot-uniform weights, zero biases, output bias = logit of the mean "
        "training pixel (the authors' code); torch: PyTorch's nn.Linear default",
    )
    add(
        "--layers",
        type=int,
        choices=(1, 2),
        default=d.model.layers,
        help="stochastic layers (Burda's two MNIST architectures)",
    )
    add("--latent-dim", type=int, default=d.model.latent_dim)
    add(
        "--hidden-dim",
        type=int,
        default=None,
        help="hidden width (default 200 with 1 layer, 100 with 2)",
    )
    add(
        "--z1-dim",
        type=int,
        default=None,
        help="with --layers 2: width of z1 (default: --hidden-dim, the paper's 100)",
    )
    add(
        "--hidden2-dim",
        type=int,
        default=None,
        help="with --layers 2: hidden width between z1 and z2 (default: --latent-dim, the "
        "paper's 50); the authors' code used --hidden-dim 200 --z1-dim 100 --hidden2-dim 100",
    )
    add(
        "--train-size",
        type=int,
        default=None,
        help="use the first N training images (default all 60000)",
    )
    _add_eval_arguments(parser, k_flag="--eval-k", eval_size=d.eval_size)
    if per_cell:
        add("--seed", type=int, default=d.seed)
    add(
        "--snr-draws",
        type=int,
        default=d.snr_draws,
        help="after the evaluation, the encoder's and decoder's gradient SNR from this many "
        "gradient draws (0 skips it)",
    )
    add("--device", choices=("auto", "cpu", "cuda"), default=d.device)
    add(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="training arithmetic (tf32: fp32 with TF32 matrix products, needs a CUDA GPU); "
        "evaluation always runs in fp32",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay each full-batch training step as a CUDA graph (needs a CUDA GPU)",
    )
    parser.add_argument(
        "--missing-rate",
        type=float,
        default=d.missing_rate,
        help="train on incomplete images: the fraction of pixels (mcar) or of images "
        "(top-half, random-square) with missing pixels, in [0, 0.9]",
    )
    parser.add_argument(
        "--missing-pattern",
        choices=MISSING_PATTERNS,
        default=d.missing_pattern,
        help="which pixels go missing when --missing-rate > 0",
    )


# The TrainConfig fields that `_add_training_arguments` sets; each option's dest is the
# field's name, except --lr's.
_TRAIN_FIELDS = (
    "objective",
    "m",
    "beta",
    "alpha",
    "k_schedule",
    "k_min",
    "ess_target",
    "epochs",
    "batch_size",
    "learning_rate",
    "schedule",
    "init",
    "train_size",
    "eval_size",
    "eval_k",
    "seed",
    "snr_draws",
    "device",
    "precision",
    "cuda_graphs",
    "missing_rate",
    "missing_pattern",
)
_MODEL_OPTIONS = ("layers", "latent_dim", "hidden_dim", "z1_dim", "hidden2_dim")


def _training_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the options give (under a preset, only those given explicitly)."""
    dests = {name: "lr" if name == "learning_rate" else name for name in _TRAIN_FIELDS}
    values = {name: getattr(args, dest) for name, dest in dests.items() if hasattr(args, dest)}
    if args.preset is not None:  # the preset's values, unless given on the command line
        given = getattr(args, "given", set())
        values = {
            name: v
            for name, v in values.items()
            if dests[name] in given or name not in PRESETS[args.preset]
        }
    return values


def _config(args: argparse.Namespace, k: int, **cell: Any) -> TrainConfig:
    model = ModelConfig(**{name: getattr(args, name) for name in _MODEL_OPTIONS})
    return preset_config(args.preset, k=k, model=model, **_training_values(args), **cell)


def _add_eval_arguments(parser: argparse.ArgumentParser, *, k_flag: str, eval_size: int) -> None:
    parser.add_argument(
        k_flag,
        dest="eval_k",
        type=int,
        action=_Given,
        default=_TRAIN_DEFAULTS.eval_k,
        help="importance samples per test image for the log-likelihood",
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        action=_Given,
        default=eval_size,
        help="test images to score (0 skips the evaluation)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {
        "train": _train,
        "study": _study,
        "eval": _eval,
        "snr": _snr,
        "impute": _impute,
        "serve": _serve,
        "worker": _worker,
    }[args.command]
    try:
        return command(args) or 0
    except (ValueError, OSError, DataError) as exc:  # bad input or data: a message, no trace
        print(f"iwae {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from models.run import train_and_evaluate

    config = _config(args, args.k)
    out = (
        args.out
        or Path("runs") / f"{config.objective}-k{config.k}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    data = _load_data()
    with _ProgressBar() as bar:
        result = train_and_evaluate(config, data, out, callbacks=[bar])
    print(json.dumps({"out": str(out), **(result.metrics or {})}, indent=2))
    return 0


def _study(args: argparse.Namespace) -> int:
    from models.study.grid import cell_config, expand_grid
    from models.study.local import run_study, write_study

    cells = expand_grid(args.ks, args.objectives, args.seeds, max_cells=None)
    # The base carries alpha only for a VR-IWAE objective; cell_config passes it on to those.
    objective = next((o for o in args.objectives if o in VR_OBJECTIVES), args.objectives[0])
    base = _config(args, max(args.ks), objective=objective, seed=args.seeds[0])
    for cell in cells:
        cell_config(base, cell)  # refuse a bad cell before any training or submission
    if args.submit is not None:
        return _submit_study(args)
    data = _load_data()
    with _ProgressBar(cells) as bar:
        outcomes = run_study(base, cells, data, args.out, [bar])
    results = write_study(base, outcomes, data, args.out)
    for outcome in outcomes:
        if outcome.error is not None:
            print(f"cell {outcome.cell.name} failed: {outcome.error}", file=sys.stderr)
    print((args.out / "study.md").read_text())
    print(
        f"study {results['status']}: wrote {args.out}/results.json, report.html, study.md "
        "and figures/",
        file=sys.stderr,
    )
    return 0 if results["status"] == "succeeded" else 1


def _submit_study(args: argparse.Namespace) -> int:
    """POST /studies with the grid and the training options; prints the study id."""
    import urllib.error
    import urllib.request

    from app.settings import get_settings

    if "device" in getattr(args, "given", set()):
        raise ValueError("--device applies to a local study; the service's workers choose")
    values = _training_values(args)
    values.pop("device", None)
    body = {
        "ks": args.ks,
        "objectives": args.objectives,
        "seeds": args.seeds,
        **({} if args.preset is None else {"preset": args.preset}),
        **values,
        **{name: getattr(args, name) for name in _MODEL_OPTIONS},
    }
    token = args.token
    if token is None and get_settings().api_token is not None:
        token = get_settings().api_token.get_secret_value()
    request = urllib.request.Request(
        args.submit.rstrip("/") + "/studies",
        data=json.dumps(body).encode(),
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
            location = response.headers.get("Location")
    except urllib.error.HTTPError as exc:
        print(
            f"iwae study: {args.submit} answered {exc.code}: {exc.read().decode()}", file=sys.stderr
        )
        return 2
    except urllib.error.URLError as exc:
        raise OSError(f"cannot reach {args.submit}: {exc.reason}") from exc
    print(answer["study_id"])
    if location:
        print(f"follow it at {args.submit.rstrip('/')}{location}", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import load_model
    from models.data import binarized_test_images
    from models.evaluation import evaluate
    from models.run import CHECKPOINT_NAME
    from models.training import resolve_device

    path = args.model / CHECKPOINT_NAME if args.model.is_dir() else args.model
    device = resolve_device(args.device)
    model, config = load_model(path, device)
    test_x = binarized_test_images(_load_data().test_images[: args.eval_size]).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    with _ProgressBar() as bar:
        metrics = evaluate(model, test_x, args.eval_k, generator=generator, callbacks=[bar])
    print(
        f"test log-likelihood: {metrics.test_loglik:.2f} ± {metrics.test_loglik_std_error:.2f}"
        f" nats per image (IWAE bound, k={args.eval_k}, {len(test_x)} test images, "
        f"binarized MNIST)"
    )
    print(f"active units per stochastic layer: {metrics.active_units}")
    print(
        f"ELBO: {metrics.test_elbo:.2f}, gap log p - ELBO: {metrics.test_gap:.2f} nats; "
        f"per-image Monte Carlo error (mean): {metrics.mc_std_error_mean:.3f} nats; "
        f"ESS (mean): {metrics.ess_mean:.1f} of {args.eval_k}"
    )
    if metrics.pareto_k_mean is not None:
        print(
            f"Pareto k-hat (mean): {metrics.pareto_k_mean:.2f}; images with k-hat > 0.7: "
            f"{100 * metrics.pareto_k_above_0_7:.1f}% (their Monte Carlo error is unreliable)"
        )
    print(json.dumps({"model": str(path), "config": config.to_dict(), **metrics.to_dict()}))
    return 0


def _snr(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import load_model
    from models.data import binarized_test_images
    from models.run import CHECKPOINT_NAME
    from models.snr import gradient_snr_per_image, snr_slopes
    from models.training import resolve_device

    path = args.model / CHECKPOINT_NAME if args.model.is_dir() else args.model
    device = resolve_device(args.device)
    model, config = load_model(path, device)
    config = config.with_changes(objective=args.objective or config.objective)
    x = binarized_test_images(_load_data().test_images[: args.images]).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    snrs = []
    for k in args.ks:
        snrs.append(
            gradient_snr_per_image(
                model, x, config.with_changes(k=k), draws=args.draws, generator=generator
            )
        )
        print(f"k={k}: {snrs[-1]}", file=sys.stderr)
    result = {
        "model": str(path),
        "objective": config.objective,
        "draws": args.draws,
        "images": len(x),
        "snr": [{"k": k, **s.to_dict()} for k, s in zip(args.ks, snrs, strict=True)],
        "slopes": snr_slopes(args.ks, snrs),
    }
    print(json.dumps(result, indent=2))
    return 0


def _impute(args: argparse.Namespace) -> int:
    from app.images import encode_imputation_strip, masked_digit
    from app.inference import impute
    from app.registry import ServedModel
    from app.settings import get_settings
    from models.checkpoint import load_model
    from models.run import CHECKPOINT_NAME
    from models.training import resolve_device

    if args.k < 1 or args.n < 0:
        raise ValueError("--k must be at least 1 and --n at least 0")
    path = args.model / CHECKPOINT_NAME if args.model.is_dir() else args.model
    model, config = load_model(path, resolve_device(args.device))
    mask = None if args.mask is None else args.mask.read_bytes()
    masked = masked_digit(args.image.read_bytes(), mask, get_settings().max_image_pixels)
    served = ServedModel(model_id=str(path), model=model, config=config)
    result = impute(served, masked.digit, masked.missing, args.k, args.n, args.seed)
    args.out.write_bytes(encode_imputation_strip(masked, result.single, result.draws))
    summary = {
        "out": str(args.out),
        "k": args.k,
        "n": args.n,
        "missing_pixels": int(masked.missing.sum()),
        "observed_log_likelihood": result.observed_log_likelihood,
    }
    print(json.dumps(summary))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from app.server import serve

    serve(args.host, args.port)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from worker.queue import run_worker

    run_worker()
    return 0


def _load_data():
    from app.settings import get_settings
    from models.data import load_mnist

    settings = get_settings()
    return load_mnist(settings.mnist_dir, download_dir=settings.download_dir)


class _ProgressBar:
    """A tqdm bar per phase (training epochs, evaluation), driven by the progress callbacks;
    with a study's `cells`, a line naming each cell as it starts."""

    def __init__(self, cells: Sequence[Cell] = ()) -> None:
        self._cells = cells

    def __enter__(self) -> _ProgressBar:
        self._bar = None
        self._key = None
        return self

    def __exit__(self, *exc: object) -> None:
        self.reset()

    def __call__(self, progress: Progress) -> None:
        if progress.phase == "cell":
            self.reset()
            cell = self._cells[progress.done]
            print(f"cell {progress.done + 1}/{progress.total}: {cell.name}", file=sys.stderr)
            return
        key = (progress.phase, progress.epoch)
        if key != self._key:
            self._restart(
                key,
                progress.total,
                progress.unit,
                {
                    "train": f"epoch {progress.epoch}/{progress.epochs}",
                    "impute": "imputing",
                    "snr": "gradient SNR",
                }.get(progress.phase, "evaluating"),
            )
        if progress.loss is not None:
            self._bar.set_postfix(loss=f"{progress.loss:.2f}", refresh=False)
        self._bar.update(progress.done - self._bar.n)  # redraws at most every mininterval

    def reset(self) -> None:
        """Close the current bar: the next progress starts a new one (a study's next cell)."""
        if self._bar is not None:
            self._bar.close()
        self._bar = None
        self._key = None

    def _restart(self, key, total: int, unit: str, description: str) -> None:
        from tqdm import tqdm

        self.reset()
        self._key = key
        self._bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            leave=True,
            file=sys.stderr,
            mininterval=0.5,
        )


if __name__ == "__main__":
    sys.exit(main())
