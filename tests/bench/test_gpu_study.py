"""bench/gpu_study.py on a CPU at a tiny size, so that a GPU's minutes go to the measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import MNIST_DIR, REPO_ROOT


@pytest.fixture
def gpu_study(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    import gpu_study

    return gpu_study


def run_script(out: Path, *options: str) -> str:
    command = [sys.executable, "bench/gpu_study.py", "--out", str(out), "--tiny", *options]
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "IWAE_DATA_DIR": str(MNIST_DIR)}
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_plan_sets_the_evaluation_aside_and_counts_whole_epochs(gpu_study) -> None:
    timing = {
        "groups": [{"seconds_per_epoch": 1.5}, {"seconds_per_epoch": 2.5}],
        "eval_seconds_per_image": 0.01,
    }
    planned = gpu_study.plan(timing, cells=4, eval_size=100, sweep_s=3.0, seconds_left=100.0)
    assert planned["grid_seconds_per_epoch"] == 4.0
    reserved = gpu_study.EVAL_OVERHEAD * 4.0 + 3.0
    assert planned["evaluation_seconds"] == pytest.approx(reserved)
    assert planned["epochs_that_fit"] == int((100.0 - reserved) // 4.0)
    short = gpu_study.plan(timing, cells=4, eval_size=100, sweep_s=0.0, seconds_left=1.0)
    assert short["epochs_that_fit"] == 0


def test_parts_run_each_kind_or_each_k_at_once_largest_k_first(gpu_study) -> None:
    cells = gpu_study.expand_grid([1, 50], ["vae", "iwae"], [0, 1], max_cells=None)
    names = lambda parts: [[c.name for c in part] for part in parts]  # noqa: E731

    assert names(gpu_study.parts(cells, 1)) == [[c.name for c in cells]]
    assert names(gpu_study.parts(cells, 4)) == [
        ["vae-k50-s0", "vae-k50-s1"],
        ["iwae-k50-s0", "iwae-k50-s1"],
        ["vae-k1-s0", "vae-k1-s1"],
        ["iwae-k1-s0", "iwae-k1-s1"],
    ]
    # Fewer processes than kinds: one per K, so that no part waits for the deadline.
    assert names(gpu_study.parts(cells, 2)) == [
        ["vae-k50-s0", "vae-k50-s1", "iwae-k50-s0", "iwae-k50-s1"],
        ["vae-k1-s0", "vae-k1-s1", "iwae-k1-s0", "iwae-k1-s1"],
    ]


def test_k_ratio_is_the_largest_k_over_the_smallest(gpu_study) -> None:
    alone = {"eager": {1: 2.0, 5: 3.0, 100: 2.6}, "graph-fp32": {1: 1.0}}
    assert gpu_study.k_ratios(alone) == {"eager": pytest.approx(1.3)}


@pytest.mark.slow
def test_a_run_out_of_time_is_continued_by_the_same_command(tmp_path: Path) -> None:
    out = tmp_path / "study"
    grid = ["--ks", "1", "5", "--seeds", "0", "--objectives", "vae", "iwae"]
    first = run_script(out, *grid, "--budget-s", "0", "--parallel", "2")
    assert "out of time" in first
    timing = json.loads((out / "timing.json").read_text())
    assert [g["k"] for g in timing["groups"]] == [1, 5]
    assert [sorted(g["cells"]) for g in timing["groups"]] == [
        ["iwae-k1-s0", "vae-k1-s0"],
        ["iwae-k5-s0", "vae-k5-s0"],
    ]
    assert set(timing["alone_seconds_per_epoch"]["eager"]) == {"1", "5"}
    assert json.loads((out / "results.json").read_text())["status"] != "succeeded"

    second = run_script(out, *grid)
    assert "timing from" in second and "out of time" not in second
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "succeeded"
    names = {cell["name"] for cell in results["cells"]}
    assert names == {"vae-k1-s0", "vae-k5-s0", "iwae-k1-s0", "iwae-k5-s0"}
    for cell in results["cells"]:
        assert cell["metrics"]["epochs"] == 2
        assert cell["metrics"]["gradient_snr"] is not None
        assert [p["epoch"] for p in cell["metrics"]["learning_curve"]] == [1, 2]
        assert (out / "samples" / f"{cell['name']}.png").stat().st_size > 0
    sweeps = json.loads((out / "snr_sweep.json").read_text())  # --tiny: the cells at K=5
    assert [(s["objective"], s["train_k"], s["ks"]) for s in sweeps] == [
        ("vae", 5, [1, 10]),
        ("iwae", 5, [1, 10]),
    ]
    for name in ("report.html", "study.md", "gpu_study.md", "figures/snr_sweep.png"):
        assert (out / name).stat().st_size > 0
