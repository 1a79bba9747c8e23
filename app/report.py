"""Tables and figures of a K study (`models.study`): Markdown and a dependency-free SVG."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from xml.sax.saxutils import escape

from models.study.local import StudyRow

_PANEL_W, _PANEL_H, _MARGIN = 320, 220, 48
_COLORS = ("#1f77b4", "#d62728")


def study_markdown(rows: Sequence[StudyRow], eval_k: int) -> str:
    """One row per K (and alpha); log-likelihood in nats per test image (IWAE bound,
    k=`eval_k`); imputation cross-entropy of the top halves of the test digits, nats per
    missing pixel."""
    lines = [
        f"| K | objective | test log p(x) (nats, k={eval_k}) | active units | "
        "train time (s) | encoder SNR (median) | decoder SNR (median) | "
        "imputation BCE: K=1 / K / mean |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        loglik = (
            "not evaluated"
            if r.test_loglik is None
            else f"{r.test_loglik:.2f} ± {r.test_loglik_std_error:.2f}"
        )
        units = "-" if r.active_units is None else "/".join(map(str, r.active_units))
        objective = r.objective if r.alpha is None else f"{r.objective} (alpha={r.alpha:g})"
        lines.append(
            f"| {r.k} | {objective} | {loglik} | {units} | {r.train_seconds:.1f} | "
            f"{r.snr_encoder:.3f} | {r.snr_decoder:.3f} | {_imputation(r)} |"
        )
    return "\n".join(lines) + "\n"


def _imputation(row: StudyRow) -> str:
    if row.imputation is None:
        return "-"
    model, mean = row.imputation["model"], row.imputation["mean"]["bce"]
    return f"{model['1']['bce']:.3f} / {model[str(row.k)]['bce']:.3f} / {mean:.3f}"


def study_svg(rows: Sequence[StudyRow]) -> str:
    """Four panels against K (log scale): log-likelihood, active units, time, gradient SNR.

    With several alphas (a VR-IWAE study), each alpha draws its own line, labelled.
    """
    panels: list[tuple[str, dict[str, Callable[[StudyRow], float | None]]]] = [
        ("test log p(x), nats", {"bound": lambda r: r.test_loglik}),
        (
            "active units",
            {"units": lambda r: None if r.active_units is None else float(sum(r.active_units))},
        ),
        ("training time, s", {"seconds": lambda r: r.train_seconds}),
        ("gradient SNR", {"encoder": lambda r: r.snr_encoder, "decoder": lambda r: r.snr_decoder}),
    ]
    parts = []
    for i, (title, series) in enumerate(panels):
        x0, y0 = (i % 2) * _PANEL_W, (i // 2) * _PANEL_H
        parts.append(_panel(rows, title, series, x0, y0))
    width, height = 2 * _PANEL_W, 2 * _PANEL_H
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">'
        f'<rect width="{width}" height="{height}" fill="white"/>{"".join(parts)}</svg>\n'
    )


def _panel(
    rows: Sequence[StudyRow],
    title: str,
    series: dict[str, Callable[[StudyRow], float | None]],
    x0: float,
    y0: float,
) -> str:
    ks = [math.log10(r.k) for r in rows]
    values = [v for f in series.values() for r in rows if (v := f(r)) is not None]
    if not values:
        return ""
    lo_k, hi_k = min(ks), max(ks)
    lo_v, hi_v = min(values), max(values)
    span_k, span_v = (hi_k - lo_k) or 1.0, (hi_v - lo_v) or 1.0
    plot_w, plot_h = _PANEL_W - 1.5 * _MARGIN, _PANEL_H - 1.5 * _MARGIN

    def point(log_k: float, value: float) -> tuple[float, float]:
        return (
            x0 + _MARGIN + (log_k - lo_k) / span_k * plot_w,
            y0 + _MARGIN / 2 + (1 - (value - lo_v) / span_v) * plot_h,
        )

    left, top = x0 + _MARGIN, y0 + _MARGIN / 2
    out = [
        f'<text x="{x0 + _PANEL_W / 2}" y="{y0 + 14}" text-anchor="middle">{escape(title)}</text>',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
        'stroke="#999"/>',
        f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{hi_v:.4g}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">{lo_v:.4g}</text>',
    ]
    for r, log_k in zip(rows, ks, strict=True):
        x, _ = point(log_k, lo_v)
        out.append(f'<text x="{x}" y="{top + plot_h + 14}" text-anchor="middle">K={r.k}</text>')
    lines = [
        list(group)
        for _, group in itertools.groupby(zip(rows, ks, strict=True), lambda p: p[0].alpha)
    ]
    for (name, f), color in zip(series.items(), _COLORS, strict=False):
        for line in lines:
            pts = [point(lk, v) for r, lk in line if (v := f(r)) is not None]
            if not pts:
                continue
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>'
            )
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts)
            labels = ([name] if len(series) > 1 else []) + (
                [f"alpha={line[0][0].alpha:g}"] if len(lines) > 1 else []
            )
            if labels:
                out.append(
                    f'<text x="{pts[-1][0] - 4}" y="{pts[-1][1] - 6}" text-anchor="end" '
                    f'fill="{color}">{escape(" ".join(labels))}</text>'
                )
    return "".join(out)
