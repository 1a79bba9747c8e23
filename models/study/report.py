"""The report of a K study: figures (matplotlib, Agg), a trade-off table, one HTML page.

Everything is drawn from `results` (`models.study.results.study_results`), except the
sample grids and reconstructions, which come from the cells' checkpoints. Figures are built
on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot, so that a server
can draw reports in several threads without a global figure state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator
from torch import Tensor

from models.checkpoint import load_model
from models.config import ModelConfig
from models.data import binarized_test_images
from models.files import write_atomic
from models.run import SNR_IMAGES
from models.study.grid import Cell

FIGURE_NAMES: tuple[str, ...] = (
    "loglik",
    "active_units",
    "seconds_per_epoch",
    "snr",
    "samples",
    "learning_curve",
)
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
MARKDOWN_NAME = "study.md"
FIGURES_DIR = "figures"

DIGITS = 8  # test digits reconstructed, and samples drawn, per row of the samples figure
_DPI = 100
_SIDE = 28  # MNIST images are 28 x 28

# Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", Table 1, MNIST:
# test log p(x) in nats (k=5000 on the 10,000 test images, 3280 epochs), per number of
# stochastic layers, objective and training K.
BURDA_TABLE_1: dict[int, dict[str, dict[int, float]]] = {
    1: {
        "vae": {1: -86.76, 5: -86.47, 50: -86.35},
        "iwae": {1: -86.76, 5: -85.54, 50: -84.78},
    },
    2: {
        "vae": {1: -85.33, 5: -85.01, 50: -84.78},
        "iwae": {1: -85.33, 5: -83.89, 50: -82.90},
    },
}
_REFERENCE_MARKERS = {"vae": "s", "iwae": "*"}  # hollow, in the objective's color
# Their architectures (section 5): 784-200-200-50, and 784-100-100-100 then 100-50-50-50;
# the 2-layer network of the authors' code (yburda/iwae) is 784-200-200-100 then 100-100-100-50.
_BURDA_MODELS = (
    ModelConfig(layers=1),
    ModelConfig(layers=2),
    ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100),
)
# Log-log slopes of gradient SNR against K in theory: Rainforth et al. (2018), theorem 1 and
# section 3: IWAE's encoder K^(-1/2), its decoder K^(1/2); averaging K ELBO estimates (VAE)
# gives both K^(1/2). DReG (Tucker et al., 2019, section 5) restores K^(1/2) for the encoder.
SNR_THEORY: dict[str, dict[str, float]] = {
    "iwae": {"encoder": -0.5, "decoder": 0.5},
    "vae": {"encoder": 0.5, "decoder": 0.5},
    "iwae-dreg": {"encoder": 0.5, "decoder": 0.5},
}


def burda_reference(model: Mapping[str, Any]) -> dict[str, dict[int, float]] | None:
    """Burda et al.'s Table 1 for the architecture `model` (a ModelConfig as a dict), None
    when it is not one of theirs."""
    if ModelConfig(**model) in _BURDA_MODELS:
        return BURDA_TABLE_1[model["layers"]]
    return None


def write_report(
    results: dict[str, Any], checkpoints: Mapping[str, Path], test_images: Tensor, out_dir: Path
) -> None:
    """Write `out_dir`/results.json, report.html (figures embedded, readable offline),
    figures/<name>.png for each of `FIGURE_NAMES`, and study.md (table, figure links).

    `checkpoints` maps a cell's name to its model.safetensors (succeeded cells); the samples
    figure draws, per (objective, K), the checkpoint of its first succeeded seed.
    `test_images` [N >= 8, D]: grey levels; the first `DIGITS`, binarized as every
    evaluation binarizes them, are reconstructed.
    """
    out_dir = Path(out_dir)
    (out_dir / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
    figures = {
        "loglik": _loglik_figure(results),
        "active_units": _active_units_figure(results),
        "seconds_per_epoch": _seconds_figure(results),
        "snr": _snr_figure(results),
        "samples": _samples_figure(results, checkpoints, test_images),
        "learning_curve": _learning_curve_figure(results),
    }
    pngs = {name: _png(figure) for name, figure in figures.items()}
    for name, png in pngs.items():
        write_atomic(out_dir / FIGURES_DIR / f"{name}.png", png)
    write_atomic(out_dir / RESULTS_NAME, json.dumps(results, indent=2).encode())
    write_atomic(out_dir / MARKDOWN_NAME, study_markdown(results).encode())
    write_atomic(out_dir / REPORT_NAME, study_html(results, pngs).encode())


# --- numbers ---------------------------------------------------------------------------------

# The trade-off table: header, how to read the cell from a summary row, decimals.
_Column = tuple[str, Callable[[dict[str, Any], dict[str, Any]], str]]


def _pm(stat: dict[str, Any], digits: int) -> str:
    """ "mean ± sd" of a summary statistic; the mean alone for one seed; "-" if unmeasured."""
    if stat["mean"] is None:
        return "-"
    if stat["sd"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def _relative(row: dict[str, Any], base: dict[str, Any] | None, name: str, ratio: bool) -> str:
    """This row's mean of `name` against the objective's smallest K: a difference or ratio."""
    if base is None or row[name]["mean"] is None or base[name]["mean"] is None:
        return "-"
    if ratio:
        return f"{row[name]['mean'] / base[name]['mean']:.2f}x"
    return f"{row[name]['mean'] - base[name]['mean']:+.2f}"


def table_columns(results: dict[str, Any]) -> list[_Column]:
    """The trade-off table's columns: each a header and a function (row, row of the
    objective's smallest K) -> the printed value."""
    config = results["config"]
    k_eval = config["eval_k"]
    return [
        ("objective", lambda r, b: r["objective"]),
        ("K", lambda r, b: str(r["k"])),
        ("seeds", lambda r, b: str(r["n"])),
        (f"test log p(x), nats (k={k_eval})", lambda r, b: _pm(r["test_loglik"], 2)),
        ("gain over smallest K, nats", lambda r, b: _relative(r, b, "test_loglik", False)),
        ("test ELBO, nats", lambda r, b: _pm(r["test_elbo"], 2)),
        ("log p(x) - ELBO, nats", lambda r, b: _pm(r["test_gap"], 2)),
        ("active units", lambda r, b: _pm(r["active_units"], 1)),
        ("encoder SNR", lambda r, b: _pm(r["snr_encoder"], 3)),
        ("decoder SNR", lambda r, b: _pm(r["snr_decoder"], 3)),
        ("s per epoch", lambda r, b: _pm(r["seconds_per_epoch"], 2)),
        ("images/s", lambda r, b: _pm(r["images_per_s"], 0)),
        ("cost vs smallest K", lambda r, b: _relative(r, b, "seconds_per_epoch", True)),
    ]


def table_rows(results: dict[str, Any]) -> list[list[str]]:
    """The trade-off table's cells as printed, one row per (objective, K), grid order."""
    columns = table_columns(results)
    smallest: dict[str, dict[str, Any]] = {}
    for row in sorted(results["summary"], key=lambda r: r["k"]):
        if row["n"]:
            smallest.setdefault(row["objective"], row)
    return [
        [value(row, smallest.get(row["objective"])) for _, value in columns]
        for row in results["summary"]
    ]


def _setup(results: dict[str, Any]) -> str:
    """One sentence on what was trained and how it was measured."""
    c = results["config"]
    m = c["model"]
    sizes = [m["x_dim"], m["hidden_dim"], m["hidden_dim"], m.get("z1_dim") or m["latent_dim"]]
    net = "-".join(map(str, sizes))
    if m["layers"] == 2:
        net += f" then {m['z1_dim']}-{m['hidden2_dim']}-{m['hidden2_dim']}-{m['latent_dim']}"
    train = "all 60,000" if c["train_size"] is None else f"the first {c['train_size']:,}"
    return (
        f"Dynamically binarized MNIST, {train} training images; network {net} "
        f"({m['layers']} stochastic layer{'s' if m['layers'] == 2 else ''}); {c['epochs']} "
        f"epoch(s), batch {c['batch_size']}, Adam at {c['learning_rate']:g} ({c['schedule']} "
        f"schedule), {c['precision']}, device {c['device']}. Test log p(x): IWAE bound with "
        f"k={c['eval_k']} on the first {c['eval_size']} test images (fixed binarization), nats "
        f"per image. Gradient SNR: bias-corrected, root-mean-square over parameters, from "
        f"{c['snr_draws']} gradient draws on {SNR_IMAGES} test images at each cell's trained "
        f"parameters (Rainforth et al., 2018), so that its slope across K includes what "
        f"training at that K did to the model. Error bars and ± are the sample standard "
        f"deviation over seeds."
    )


def _slopes_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for objective, slopes in results["snr_slopes"].items():
        theory = SNR_THEORY.get(objective, {})
        parts = [
            f"{network} {_number(slopes[network], '+.2f')} "
            f"(theory {_number(theory.get(network), '+.1f')})"
            for network in ("encoder", "decoder")
        ]
        lines.append(f"{objective}: {', '.join(parts)}")
    return lines


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _failed(results: dict[str, Any]) -> list[str]:
    return [
        f"{c['name']}: {c['status']}" + (f" ({c['error']})" if c["error"] else "")
        for c in results["cells"]
        if c["status"] != "succeeded"
    ]


def study_markdown(results: dict[str, Any]) -> str:
    """study.md: setup, the trade-off table, SNR slopes, unfinished cells, figure links."""
    headers = [name for name, _ in table_columns(results)]
    lines = [
        "# K study",
        "",
        f"Status: {results['status']}. {_setup(results)}",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", "Fitted log-log slope of gradient SNR against K:", ""]
    lines += [f"- {line}" for line in _slopes_lines(results)]
    failed = _failed(results)
    if failed:
        lines += ["", "Cells without results:", ""] + [f"- {line}" for line in failed]
    lines.append("")
    lines += [f"![{name}]({FIGURES_DIR}/{name}.png)" for name in FIGURE_NAMES]
    return "\n".join(lines) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;"
    "padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;display:block;margin:1em 0}"
)


def study_html(results: dict[str, Any], pngs: Mapping[str, bytes]) -> str:
    """report.html: the study.md content with every figure embedded as a base64 PNG."""
    e = html.escape
    head = "".join(f"<th>{e(name)}</th>" for name, _ in table_columns(results))
    body = "".join(
        "<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
        for row in table_rows(results)
    )
    slopes = "".join(f"<li>{e(line)}</li>" for line in _slopes_lines(results))
    failed = _failed(results)
    figures = "".join(
        f'<h2>{e(name)}</h2><img alt="{e(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}">'
        for name, png in pngs.items()
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>K study</title>'
        f"<style>{_CSS}</style></head><body><h1>K study</h1>"
        f"<p>Status: {e(results['status'])}. {e(_setup(results))}</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<p>Fitted log-log slope of gradient SNR against K:</p><ul>{slopes}</ul>"
        + (
            "<p>Cells without results:</p><ul>"
            + "".join(f"<li>{e(line)}</li>" for line in failed)
            + "</ul>"
            if failed
            else ""
        )
        + f"{figures}</body></html>\n"
    )


# --- figures ---------------------------------------------------------------------------------


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _series(
    results: dict[str, Any], name: str
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per objective: the K, mean and sd (0 for one seed) of `name` where it was measured."""
    series: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for row in results["summary"]:
        stat = row[name]
        if stat["mean"] is None:
            continue
        ks, means, sds = series.setdefault(row["objective"], ([], [], []))
        ks.append(row["k"])
        means.append(stat["mean"])
        sds.append(stat["sd"] or 0.0)
    return series


def _k_axis(ax: Any, ks: Sequence[int]) -> None:
    """K on a log axis, ticks at the study's K, written as integers."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ks))))
    ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("K, importance samples per image in training (log scale)")
    ax.set_xlim(min(ks) / 1.5, max(ks) * 1.5)  # room for the dodged points, even at one K


def _log_y_axis(ax: Any) -> None:
    """A log y axis with plain-number ticks at 1, 2, 5 x 10^n (every digit in a narrow
    range; in a very narrow one, three ticks evenly spaced on the log scale)."""
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    for digits in ((1, 2, 5), range(1, 10)):
        ticks = [
            d * 10.0**n
            for n in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
            for d in digits
            if low <= d * 10.0**n <= high
        ]
        if len(ticks) >= 3:
            break
    else:
        ticks = list(np.geomspace(low, high, 5)[1:-1])
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.3g}")
    ax.yaxis.set_minor_locator(NullLocator())


def _all_ks(results: dict[str, Any]) -> list[int]:
    return [row["k"] for row in results["summary"]] or [1]


def _colors(results: dict[str, Any]) -> dict[str, str]:
    """One color per objective, the same in every figure."""
    objectives = dict.fromkeys(row["objective"] for row in results["summary"])
    return {objective: f"C{i % 10}" for i, objective in enumerate(objectives)}


# The figures of one summary field against K: figure name -> (field, y label, title).
_LINE_FIGURES = {
    "loglik": (
        "test_loglik",
        "test log p(x), nats per image (k={eval_k})",
        "Test log-likelihood against K",
    ),
    "active_units": (
        "active_units",
        "active units (Cov_x E_q[z|x] > 0.01), count",
        "Active latent units against K",
    ),
    "seconds_per_epoch": (
        "seconds_per_epoch",
        "training wall time per epoch, s",
        "Training cost against K",
    ),
}


def _line_figure(results: dict[str, Any], name: str) -> Figure:
    """The `_LINE_FIGURES` entry `name`: one line per objective, error bars = sd over seeds."""
    field, ylabel, title = _LINE_FIGURES[name]
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    _draw_series(ax, _series(results, field), _colors(results))
    _k_axis(ax, _all_ks(results))
    ax.set_ylabel(ylabel.format(**results["config"]))
    ax.set_title(f"{title} (mean ± sd over seeds)")
    return figure


def _draw_series(
    ax: Any,
    series: Mapping[str, tuple[list[int], list[float], list[float]]],
    colors: Mapping[str, str],
    label: Callable[[str], str] = str,
) -> None:
    for i, (objective, (ks, means, sds)) in enumerate(series.items()):
        # Each objective a little to the side, so that equal values stay visible.
        dodge = 1.04 ** (i - (len(series) - 1) / 2)
        ax.errorbar(
            [k * dodge for k in ks],
            means,
            yerr=sds,
            marker="o",
            capsize=3,
            color=colors[objective],
            label=label(objective),
        )
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)


def _loglik_figure(results: dict[str, Any]) -> Figure:
    figure = _line_figure(results, "loglik")
    ax = figure.axes[0]
    reference = burda_reference(results["config"]["model"])
    if reference is not None:
        colors = _colors(results)
        for objective in dict.fromkeys(row["objective"] for row in results["summary"]):
            if objective in reference:
                ks, values = zip(*sorted(reference[objective].items()), strict=True)
                ax.plot(
                    ks,
                    values,
                    linestyle="none",
                    marker=_REFERENCE_MARKERS.get(objective, "*"),
                    markersize=10,
                    markerfacecolor="none",
                    color=colors[objective],
                    label=f"{objective}, Burda et al. Table 1 (3280 epochs)",
                )
        _k_axis(ax, [*_all_ks(results), *BURDA_TABLE_1[1]["iwae"]])
        ax.legend(fontsize="small")
    return figure


def _active_units_figure(results: dict[str, Any]) -> Figure:
    figure = _line_figure(results, "active_units")
    total = sum(ModelConfig(**results["config"]["model"]).latent_dims)
    ax = figure.axes[0]
    ax.axhline(total, color="gray", linestyle="--", linewidth=1)
    ax.annotate(
        f"all {total} latent units",
        (0.5, total),
        xycoords=("axes fraction", "data"),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize="small",
        color="gray",
    )
    ax.set_ylim(0, total * 1.1)
    return figure


def _seconds_figure(results: dict[str, Any]) -> Figure:
    figure = _line_figure(results, "seconds_per_epoch")
    figure.axes[0].set_ylim(bottom=0)  # from 0, so that heights compare as costs do
    return figure


def _snr_figure(results: dict[str, Any]) -> Figure:
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    ks, slopes, colors = _all_ks(results), results["snr_slopes"], _colors(results)
    for i, network in enumerate(("encoder", "decoder")):
        ax = figure.add_subplot(1, 2, i + 1)
        series = _series(results, f"snr_{network}")

        def label(objective: str, network: str = network) -> str:
            slope = slopes.get(objective, {}).get(network)
            theory = SNR_THEORY.get(objective, {}).get(network)
            return (
                f"{objective}: fitted slope {_number(slope, '+.2f')}, "
                f"theory {_number(theory, '+.1f')}"
            )

        _draw_series(ax, series, colors, label)
        for objective, (ks_, means, _) in series.items():
            theory = SNR_THEORY.get(objective, {}).get(network)
            if theory is not None and len(set(ks_)) > 1 and all(m > 0 for m in means):
                # The theory's slope through the line's first point, for the eye.
                xs = np.array([min(ks_), max(ks_)], dtype=float)
                ax.plot(
                    xs,
                    means[0] * (xs / ks_[0]) ** theory,
                    color=colors[objective],
                    linestyle=":",
                    linewidth=1,
                )
        if series:
            ax.plot([], [], color="gray", linestyle=":", label="theory's slope (dotted)")
            ax.legend(fontsize="small")
            _log_y_axis(ax)
        _k_axis(ax, ks)
        ax.set_ylabel(f"{network} gradient SNR, RMS over parameters")
        ax.set_title(f"{network.capitalize()} gradient SNR against K (log-log)")
    return figure


def snr_sweep_figure(sweeps: Sequence[Mapping[str, Any]]) -> Figure:
    """Gradient SNR against the K it is measured at, the parameters fixed (Rainforth et al.,
    2018, theorem 1): per network, one line per (objective, trained K) of pooled sweeps
    (`models.snr.pool_sweeps`), the RMS summary, mean ± sd over models, the fitted slope
    (mean ± sd over images) in the legend."""
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    for i, network in enumerate(("encoder", "decoder")):
        ax = figure.add_subplot(1, 2, i + 1)
        for j, sweep in enumerate(sweeps):
            stats = sweep["snr"][network]["rms"]
            slope = sweep["slopes"][network]["rms"]
            ax.errorbar(
                sweep["ks"],
                [s["mean"] for s in stats],
                yerr=[s["sd"] or 0.0 for s in stats],
                marker="o",
                capsize=3,
                color=f"C{j % 10}",
                label=f"{sweep['objective']} trained at K={sweep['train_k']}: slope "
                f"{_number(slope['mean'], '+.2f')} ± {_number(slope['sd'], '.2f')}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("K of the gradient estimator (log scale)")
        ax.set_ylabel(f"{network} gradient SNR, RMS over parameters")
        ax.set_title(f"{network.capitalize()} SNR at fixed parameters")
        ax.grid(True, alpha=0.3)
        if sweeps:
            ax.legend(fontsize="x-small")
    return figure


def write_figure(figure: Figure, path: Path) -> None:
    """`figure` as a PNG at `path`, its folder made if need be."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(path), _png(figure))


def _learning_curve_figure(results: dict[str, Any]) -> Figure:
    """One panel per K: each objective's learning-curve bound against epochs, mean over seeds
    with a band of ± sd, so that the epoch where one objective passes another shows."""
    curves = results.get("learning_curves") or []
    ks = sorted({c["k"] for c in curves}) or [None]
    columns = min(3, len(ks))
    rows = -(-len(ks) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    colors = _colors(results)
    for i, k in enumerate(ks):
        ax = figure.add_subplot(rows, columns, i + 1)
        for curve in (c for c in curves if c["k"] == k):
            means = np.array([p["mean"] for p in curve["test_bound"]])
            sds = np.array([p["sd"] or 0.0 for p in curve["test_bound"]])
            color = colors.get(curve["objective"], "C0")
            ax.plot(curve["epochs"], means, color=color, label=curve["objective"])
            ax.fill_between(curve["epochs"], means - sds, means + sds, color=color, alpha=0.2)
        if k is None:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_title(f"trained at K={k}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test bound, nats")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if curves:
        first = curves[0]
        figure.suptitle(
            f"Learning curves: the IWAE bound at k={first['eval_k']} on {first['images']} "
            f"test images (mean ± sd over {first['test_bound'][0]['n']} seeds)"
        )
    return figure


def _samples_figure(
    results: dict[str, Any], checkpoints: Mapping[str, Path], test_images: Tensor
) -> Figure:
    """One row per (objective, K): `DIGITS` samples, then reconstructions of the first
    `DIGITS` test digits (the top row shows those digits)."""
    digits = binarized_test_images(test_images[:DIGITS].float())  # [8, D]
    rows: list[tuple[Tensor | None, Tensor]] = [(None, digits)]
    labels = ["test digits"]
    for row in results["summary"]:
        names = [Cell(row["objective"], row["k"], seed).name for seed in row["seeds"]]
        path = next((checkpoints[n] for n in names if n in checkpoints), None)
        if path is None:
            continue
        model, config = load_model(path, "cpu")
        with torch.inference_mode():
            samples = model.sample(DIGITS, torch.Generator().manual_seed(0))  # [8, D]
            recon = model.reconstruct(digits)  # [8, D]
        rows.append((samples.float(), recon.float()))
        labels.append(f"{row['objective']} K={row['k']} (seed {config.seed})")
    mosaic = _mosaic(rows)
    # Margins in inches around an image 7 inches wide: row labels left, column labels below.
    left, right, bottom, width = 1.6, 0.15, 0.35, 7.0
    top = 0.35 if len(rows) == 1 else 0.1  # room for the title that says why it is empty
    height = width * mosaic.shape[0] / mosaic.shape[1]
    size = (left + width + right, bottom + height + top)
    figure = Figure(figsize=size)
    ax = figure.add_axes((left / size[0], bottom / size[1], width / size[0], height / size[1]))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(i + 0.5) * (_SIDE + 2) for i in range(len(rows))], labels, fontsize="small")
    ax.set_xticks(
        [DIGITS * (_SIDE + 2) / 2, (DIGITS * 1.5) * (_SIDE + 2) + _SIDE],
        ["samples from the model (Bernoulli means)", "reconstructions of the test digits"],
    )
    ax.tick_params(length=0)
    if len(rows) == 1:
        ax.set_title("no succeeded cell to draw from")
    return figure


def _mosaic(rows: Sequence[tuple[Tensor | None, Tensor]]) -> np.ndarray:
    """Rows of (samples, reconstructions), each [DIGITS, D] (samples None: left empty) -> one
    grey image, 2 px between digits and one digit's width between the two halves."""
    gap, side = 2, _SIDE
    out = np.full((len(rows) * (side + gap), 2 * DIGITS * (side + gap) + side), 0.5, np.float32)
    for r, (samples, recon) in enumerate(rows):
        for half, images in enumerate((samples, recon)):
            if images is None:
                continue
            for c, image in enumerate(images.reshape(-1, side, side).cpu().numpy()):
                x = (half * DIGITS + c) * (side + gap) + half * side
                out[r * (side + gap) : r * (side + gap) + side, x : x + side] = image
    return out
