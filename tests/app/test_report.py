"""Study tables and figures: every row rendered, valid SVG, missing evaluations tolerated."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from app.report import study_markdown, study_svg
from models.study.local import StudyRow

ROWS = [
    StudyRow(1, "iwae", -95.5, 0.2, [19], 10.0, 0.9, 5.0),
    StudyRow(5, "iwae", -90.25, 0.21, [22], 20.0, 0.5, 7.5),
    StudyRow(50, "iwae", -88.0, 0.19, [25], 150.0, 0.2, 9.0),
]


def test_markdown_has_a_row_per_k_with_its_values():
    lines = study_markdown(ROWS, eval_k=5000).splitlines()
    assert "k=5000" in lines[0]
    assert len(lines) == 2 + len(ROWS)
    assert lines[3].startswith("| 5 | iwae | -90.25 ± 0.21 | 22 | 20.0 | 0.500 | 7.500 |")


def test_markdown_says_when_a_run_was_not_evaluated():
    row = StudyRow(5, "vae", None, None, None, 1.0, 0.1, 0.2)
    assert "| 5 | vae | not evaluated | - |" in study_markdown([row], eval_k=10)
    assert study_markdown([row], eval_k=10).splitlines()[-1].endswith("| 0.200 | - |")


def test_markdown_shows_the_imputation_metric_at_k_1_and_the_runs_k():
    score = {"accuracy": 0.9}
    imputation = {
        "mean": {**score, "bce": 0.244},
        "model": {"1": {**score, "bce": 0.31}, "5": {**score, "bce": 0.2849}},
    }
    row = StudyRow(5, "iwae", -90.0, 0.2, [22], 20.0, 0.5, 7.5, imputation=imputation)

    assert study_markdown([row], eval_k=10).splitlines()[-1].endswith("| 0.310 / 0.285 / 0.244 |")


def test_svg_is_well_formed_with_a_point_per_k_and_series():
    root = ET.fromstring(study_svg(ROWS))
    circles = root.findall("{http://www.w3.org/2000/svg}circle")
    # bound, units and time have one series each; SNR has two (encoder, decoder).
    assert len(circles) == 5 * len(ROWS)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "gradient SNR" in texts and "K=50" in texts


def test_svg_of_a_single_k_without_evaluation_is_still_valid():
    row = StudyRow(5, "vae", None, None, None, 1.0, 0.1, 0.2)
    root = ET.fromstring(study_svg([row]))
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) == 3


def test_a_study_over_alphas_labels_and_draws_each_alpha():
    rows = [
        StudyRow(k, "vr-iwae", -90.0 - a, 0.2, [20], 1.0, 0.5, 1.0, alpha=a)
        for a in (0.0, 0.5)
        for k in (1, 5)
    ]
    assert "| 5 | vr-iwae (alpha=0.5) |" in study_markdown(rows, eval_k=100)
    root = ET.fromstring(study_svg(rows))
    # Per panel one line per alpha and series: 2 * (1 + 1 + 1 + 2) lines.
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 10
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "alpha=0.5" in texts and "encoder alpha=0" in texts
