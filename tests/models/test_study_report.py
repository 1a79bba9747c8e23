"""The study report: every figure a valid small PNG, and every printed number the one in
results.json."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.config import ModelConfig, TrainConfig
from models.study.grid import Cell, shared_config
from models.study.report import (
    BURDA_TABLE_1,
    FIGURE_NAMES,
    burda_reference,
    table_columns,
    write_report,
)
from models.study.results import CellOutcome, study_results
from models.training import train

# Column header -> (summary field, decimals) of the trade-off table's "mean ± sd" columns.
PM_COLUMNS = {
    "test log p(x), nats (k=5000)": ("test_loglik", 2),
    "test ELBO, nats": ("test_elbo", 2),
    "log p(x) - ELBO, nats": ("test_gap", 2),
    "active units": ("active_units", 1),
    "encoder SNR": ("snr_encoder", 3),
    "decoder SNR": ("snr_decoder", 3),
    "s per epoch": ("seconds_per_epoch", 2),
    "images/s": ("images_per_s", 0),
}


def metrics(objective: str, k: int, seed: int) -> dict:
    """Made-up measurements that differ per cell (so that a mixed-up row shows)."""
    shift = (k**0.5) * (2.0 if objective == "iwae" else 0.5) + 0.37 * seed
    snr = {"median": 1.0, "direction": 1.0, "parameters": 100}
    return {
        "test_loglik": -100.0 + shift,
        "test_loglik_std_error": 0.8,
        "test_elbo": -104.123 + shift / 2,
        "test_gap": 4.0 + shift / 2,
        "active_units": [20 + k // 5 + seed],
        "seconds_per_epoch": 10.0 * k**0.7 + seed,
        "images_per_s": 6000.0 / (k**0.7 + seed / 10),
        "gradient_snr": {
            "encoder": {**snr, "rms": 0.8 * k ** (-0.45) + 0.01 * seed},
            "decoder": {**snr, "rms": 2.0 * k**0.55 + 0.1 * seed},
        },
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small 784-pixel model trained for one epoch on noise: enough to draw from."""
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    config = TrainConfig(
        k=2, model=ModelConfig(latent_dim=2, hidden_dim=8), eval_size=0, device="cpu"
    )
    train(
        config,
        torch.rand(20, 784, generator=torch.Generator().manual_seed(0)),
        checkpoint_path=path,
    )
    return path


@pytest.fixture(scope="module")
def results() -> dict:
    outcomes = []
    for objective in ("vae", "iwae"):
        for k in (1, 5, 50):
            for seed in (0, 1):
                cell = Cell(objective, k, seed)
                failed = (objective, k, seed) == ("iwae", 50, 1)
                outcomes.append(
                    CellOutcome(
                        cell=cell,
                        status="failed" if failed else "succeeded",
                        config={"objective": objective, "k": k, "seed": seed},
                        metrics=None if failed else metrics(objective, k, seed),
                        error="CUDA out of memory" if failed else None,
                    )
                )
    return study_results(outcomes, shared_config(TrainConfig(snr_draws=100)))


@pytest.fixture(scope="module")
def report(tmp_path_factory, results, checkpoint) -> Path:
    out = tmp_path_factory.mktemp("report")
    checkpoints = {c["name"]: checkpoint for c in results["cells"] if c["status"] == "succeeded"}
    test_images = torch.rand(10, 784, generator=torch.Generator().manual_seed(1))
    write_report(results, checkpoints, test_images, out)
    return out


def test_every_figure_is_a_small_valid_png(report):
    assert sorted(p.name for p in (report / "figures").iterdir()) == sorted(
        f"{name}.png" for name in FIGURE_NAMES
    )
    for name in FIGURE_NAMES:
        data = (report / "figures" / f"{name}.png").read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "PNG"
            assert 300 <= image.width <= 1200 and 150 <= image.height <= 1000, image.size
        assert len(data) < 200_000


def test_results_json_is_the_results(report, results):
    assert json.loads((report / "results.json").read_text()) == results


class Page(HTMLParser):
    """The table cells, list items and image sources of report.html, and every link."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.items: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self._text: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th", "li"):
            self._text = []
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append("".join(self._text))
            self._text = None
        elif tag == "li":
            self.items.append("".join(self._text))
            self._text = None


def markdown_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [
        [cell.strip() for cell in row.strip("|").split("|")] for row in rows if "---" not in row
    ]


def check_table(rows: list[list[str]], results: dict) -> None:
    """The printed table says what results.json says, row for row, to the printed digits."""
    header, *body = rows
    assert header == [name for name, _ in table_columns(results)]
    assert len(body) == len(results["summary"])
    for printed, summary in zip(body, results["summary"], strict=True):
        cells = dict(zip(header, printed, strict=True))
        assert (cells["objective"], int(cells["K"])) == (summary["objective"], summary["k"])
        assert int(cells["seeds"]) == summary["n"]
        for column, (field, digits) in PM_COLUMNS.items():
            stat = summary[field]
            mean, _, sd = cells[column].partition(" ± ")
            assert float(mean) == pytest.approx(stat["mean"], abs=0.51 * 10**-digits), column
            if stat["sd"] is None:
                assert sd == "", column
            else:
                assert float(sd) == pytest.approx(stat["sd"], abs=0.51 * 10**-digits), column


def test_the_html_table_and_slopes_equal_results_json(report, results):
    page = Page()
    page.feed((report / "report.html").read_text())

    check_table(page.rows, results)
    for objective, slopes in results["snr_slopes"].items():
        [line] = [item for item in page.items if item.startswith(f"{objective}:")]
        printed = [float(v) for v in re.findall(r"(?:encoder|decoder) ([+-][0-9.]+)", line)]
        assert printed == [pytest.approx(slopes[n], abs=0.006) for n in ("encoder", "decoder")]
    assert "iwae-k50-s1: failed (CUDA out of memory)" in page.items


def test_the_html_embeds_every_figure_and_loads_nothing(report):
    page = Page()
    page.feed((report / "report.html").read_text())

    assert len(page.images) == len(FIGURE_NAMES)
    for name, src in zip(FIGURE_NAMES, page.images, strict=True):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert (
            base64.b64decode(src[len(prefix) :])
            == (report / "figures" / f"{name}.png").read_bytes()
        )
    assert all(link.startswith("data:") for link in page.links)


def test_study_md_has_the_same_table_and_links_each_figure(report, results):
    text = (report / "study.md").read_text()

    check_table(markdown_rows(text), results)
    for name in FIGURE_NAMES:
        assert f"](figures/{name}.png)" in text
        assert (report / "figures" / f"{name}.png").is_file()
    assert "- iwae-k50-s1: failed (CUDA out of memory)" in text


def test_the_gain_and_cost_columns_compare_with_the_objectives_smallest_k(report, results):
    rows = markdown_rows((report / "study.md").read_text())
    header, *body = rows
    gain, cost = header.index("gain over smallest K, nats"), header.index("cost vs smallest K")
    summary = {(r["objective"], r["k"]): r for r in results["summary"]}
    for printed in body:
        row, base = summary[printed[0], int(printed[1])], summary[printed[0], 1]
        expected = row["test_loglik"]["mean"] - base["test_loglik"]["mean"]
        assert float(printed[gain]) == pytest.approx(expected, abs=0.006)
        ratio = row["seconds_per_epoch"]["mean"] / base["seconds_per_epoch"]["mean"]
        assert float(printed[cost].removesuffix("x")) == pytest.approx(ratio, abs=0.006)


def test_burda_table_1_is_the_reference_for_their_architectures_only():
    one_layer = ModelConfig(layers=1)
    assert burda_reference(one_layer.__dict__) == BURDA_TABLE_1[1]
    assert BURDA_TABLE_1[1]["iwae"][50] == -84.78 and BURDA_TABLE_1[2]["iwae"][50] == -82.90
    assert burda_reference(ModelConfig(layers=2).__dict__) == BURDA_TABLE_1[2]
    authors_code = ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)
    assert burda_reference(authors_code.__dict__) == BURDA_TABLE_1[2]
    assert burda_reference(ModelConfig(latent_dim=2, hidden_dim=8).__dict__) is None


def test_a_study_without_results_still_writes_every_figure(tmp_path, checkpoint):
    outcome = CellOutcome(Cell("iwae", 5, 0), "failed", {}, None, error="boom")
    results = study_results([outcome], shared_config(TrainConfig()))

    write_report(results, {}, torch.rand(8, 784), tmp_path)

    for name in FIGURE_NAMES:
        assert (tmp_path / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert "| iwae | 5 | 0 | - |" in (tmp_path / "study.md").read_text()
    assert "Status: failed." in (tmp_path / "report.html").read_text()
