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
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo

from app.schemas import StudyRequest, TrainRequest
from models.config import DEVICES, OBJECTIVES, TrainConfig, over_preset, preset_config
from models.data import DataError
from models.study.grid import CELL_FIELDS, STUDY_SNR_DRAWS, base_cell

if TYPE_CHECKING:
    from models.progress import Progress
    from models.study.grid import Cell

_TRAIN_DEFAULTS = TrainConfig()


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
    _add_field(train, "k")
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
    grid = StudyRequest.model_fields
    study.add_argument(
        "--objectives", choices=OBJECTIVES, nargs="+", default=grid["objectives"].default
    )
    study.add_argument("--seeds", type=int, nargs="+", default=grid["seeds"].default)
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
    _add_field(evaluate, "eval_k", flag="--k")
    _add_field(evaluate, "eval_size")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")
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
    snr.add_argument("--device", choices=DEVICES, default="auto")
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
    impute.add_argument("--device", choices=DEVICES, default="cpu")

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
    """Stores the value (a flag's `const`) and records its name in `namespace.given`, so that
    values given on the command line override a preset while the defaults do not."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


# Options whose name is not their TrainRequest field's.
_DESTS = {"learning_rate": "lr"}
# TrainRequest fields with an option of their own in each command (k: `train --k`, a study's
# --ks), and the TrainConfig field that requests leave to the workers.
_OWN_OPTION = ("preset", "k")
_LOCAL_ONLY = "device"


def _add_training_arguments(parser: argparse.ArgumentParser, per_cell: bool = True) -> None:
    """An option for every POST /train field but K, made from the request schema's field
    (type or choices, range, default, description); without `per_cell`, also without the
    objective and the seed (a study's grid sets them). Then --device, which the service's
    workers choose."""
    _add_field(parser, "preset")
    for name in TrainRequest.model_fields:
        if name not in _OWN_OPTION and (per_cell or name not in CELL_FIELDS):
            _add_field(parser, name)
    parser.add_argument("--device", action=_Given, choices=DEVICES, default=_TRAIN_DEFAULTS.device)


def _add_field(parser: argparse.ArgumentParser, name: str, *, flag: str | None = None) -> None:
    """The option of TrainRequest's field `name` (`flag`: other than --field-name)."""
    field = TrainRequest.model_fields[name]
    dest = _DESTS.get(name, name)
    kind, choices = _option_type(field.annotation)
    options: dict[str, Any] = {"dest": dest, "action": _Given, "help": _help(field)}
    if kind is bool:
        options |= {"nargs": 0, "const": True}
    else:
        options |= {"type": kind, "choices": choices}
    if field.is_required():
        options["required"] = True
    else:
        options["default"] = field.default
    parser.add_argument(flag or "--" + dest.replace("_", "-"), **options)


def _option_type(annotation: Any) -> tuple[type, tuple[Any, ...] | None]:
    """(type, choices) of a field's annotation: `int | None` is int, `Literal[...]` its values."""
    if get_origin(annotation) in (Union, UnionType):
        [annotation] = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is Literal:
        choices = get_args(annotation)
        return type(choices[0]), choices
    return annotation, None


def _help(field: FieldInfo) -> str:
    """The field's description (argparse's %-escaped) and its range."""
    bounds = {
        name: getattr(m, name)
        for m in field.metadata
        for name in ("ge", "gt", "le", "lt")
        if hasattr(m, name)
    }
    text = (field.description or "").replace("`", "").replace("%", "%%")
    if bounds:
        low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds.get('gt', '-inf')}"
        high = f"{bounds['le']}]" if "le" in bounds else f"{bounds.get('lt', 'inf')})"
        text += f" Range {low}, {high}."
    return text


def _training_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields (the model's flat) that the options give, K aside."""
    names = [n for n in TrainRequest.model_fields if n not in _OWN_OPTION] + [_LOCAL_ONLY]
    return {
        name: getattr(args, _DESTS.get(name, name))
        for name in names
        if hasattr(args, _DESTS.get(name, name))
    }


def _given(args: argparse.Namespace) -> set[str]:
    """The fields given on the command line (those that override a preset)."""
    names = {_DESTS.get(name, name): name for name in TrainRequest.model_fields}
    return {names.get(dest, dest) for dest in getattr(args, "given", ())}


def _config(args: argparse.Namespace, k: int, **cell: Any) -> TrainConfig:
    given = _given(args) | {"k", *cell}
    return preset_config(args.preset, given=given, k=k, **_training_values(args), **cell)


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
    grid = base_cell(args.ks, args.objectives, args.seeds, args.alpha)
    base = _config(args, grid.pop("k"), **grid)
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
    values = over_preset(args.preset, _training_values(args), _given(args))
    values.pop(_LOCAL_ONLY)
    body = {
        "ks": args.ks,
        "objectives": args.objectives,
        "seeds": args.seeds,
        **({} if args.preset is None else {"preset": args.preset}),
        **values,
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
    from models.training import resolve_device

    path = _checkpoint_path(args.model)
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
    from models.snr import snr_sweep
    from models.training import resolve_device

    path = _checkpoint_path(args.model)
    device = resolve_device(args.device)
    model, config = load_model(path, device)
    config = config.with_changes(objective=args.objective or config.objective)
    x = binarized_test_images(_load_data().test_images[: args.images]).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    sweep = snr_sweep(model, x, config, args.ks, draws=args.draws, generator=generator)
    result = {"model": str(path), "objective": config.objective, **sweep.to_dict()}
    print(json.dumps(result, indent=2))
    return 0


def _impute(args: argparse.Namespace) -> int:
    from app.images import encode_imputation_strip, masked_digit
    from app.inference import impute
    from app.registry import ServedModel
    from app.settings import get_settings
    from models.checkpoint import load_model
    from models.training import resolve_device

    if args.k < 1 or args.n < 0:
        raise ValueError("--k must be at least 1 and --n at least 0")
    path = _checkpoint_path(args.model)
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


def _checkpoint_path(model: Path) -> Path:
    """The checkpoint that --model names: a model.safetensors file or the folder holding it."""
    from models.run import CHECKPOINT_NAME

    return model / CHECKPOINT_NAME if model.is_dir() else model


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
