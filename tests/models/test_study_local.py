"""A study on one machine: one run per cell, its measurements, finished cells reused."""

from __future__ import annotations

import math
from unittest import mock

import pytest

from models.checkpoint import load_checkpoint
from models.curve import CURVE_NAME, CurveSpec, read_curve
from models.progress import Progress
from models.run import train_and_evaluate
from models.stacked import train_stacked
from models.study.grid import Cell, cell_config, expand_grid
from models.study.local import cell_dir, run_study, study_outcomes
from models.study.results import study_results

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base(train_config):
    """One epoch, 5 test images at eval_k=20, SNR from 8 draws."""
    return train_config.with_changes(epochs=1, eval_size=5, snr_draws=8)


def test_each_cell_trains_once_and_measures_what_the_report_needs(tmp_path, base, synthetic_mnist):
    cells = expand_grid([1, 4], ["vae", "iwae"], [0], max_cells=None)
    started = []

    def on_cell_start(progress: Progress) -> None:
        if progress.phase == "cell":
            started.append((progress.done, cells[progress.done]))

    outcomes = run_study(base, cells, synthetic_mnist, tmp_path, callbacks=[on_cell_start])

    # Cells of one K share their shapes: K=1's two objectives train as a group, then K=4's.
    assert started == [(i, cells[i]) for i in (0, 2, 1, 3)]
    assert [o.cell for o in outcomes] == cells
    for outcome in outcomes:
        assert outcome.status == "succeeded" and outcome.error is None
        assert outcome.checkpoint == cell_dir(tmp_path, outcome.cell) / "model.safetensors"
        assert outcome.checkpoint.is_file()
        config = load_checkpoint(outcome.checkpoint).config
        assert (config.objective, config.k, config.seed) == (
            outcome.cell.objective,
            outcome.cell.k,
            outcome.cell.seed,
        )
        assert outcome.config == config.to_dict()
        m = outcome.metrics
        assert m["test_loglik"] < 0 and m["test_loglik_std_error"] >= 0
        assert len(m["active_units"]) == base.model.layers
        assert m["seconds_per_epoch"] > 0 and m["images_per_s"] > 0
        for network in ("encoder", "decoder"):
            assert math.isfinite(m["gradient_snr"][network]["median"])
    # K changes the bound, so K=1 and K=4 must not give the same model...
    assert outcomes[0].metrics["test_loglik"] != outcomes[1].metrics["test_loglik"]
    # ...while at K=1 the VAE and the IWAE objectives are the same (same seed, same draws).
    assert outcomes[0].metrics["test_loglik"] == outcomes[2].metrics["test_loglik"]


def test_finished_cells_are_reused_and_a_changed_config_runs_again(tmp_path, base, synthetic_mnist):
    cells = [Cell("iwae", 2, 0)]
    [first] = run_study(base, cells, synthetic_mnist, tmp_path)
    written = first.checkpoint.stat().st_mtime_ns
    seen = []

    def record(progress: Progress) -> None:  # a cell's training and evaluation
        if progress.phase != "cell":
            seen.append(progress)

    [again] = run_study(base, cells, synthetic_mnist, tmp_path, callbacks=[record])

    assert seen == []  # neither trained nor evaluated again
    assert first.checkpoint.stat().st_mtime_ns == written
    assert again.metrics == first.metrics

    [more] = run_study(
        base.with_changes(epochs=2), cells, synthetic_mnist, tmp_path, callbacks=[record]
    )
    # The second epoch resumes from the first.
    assert {p.epoch for p in seen if p.phase == "train"} == {2}
    assert more.metrics["epochs"] == 2


def test_a_stopping_callback_cancels_its_cell_and_leaves_the_rest_queued(
    tmp_path, base, synthetic_mnist
):
    cells = [Cell("iwae", 1, 0), Cell("iwae", 2, 0)]
    outcomes = run_study(base, cells, synthetic_mnist, tmp_path, callbacks=[lambda p: True])

    assert [o.status for o in outcomes] == ["cancelled", "queued"]
    assert all(o.metrics is None for o in outcomes)
    assert not cell_dir(tmp_path, cells[1]).exists()


def test_a_failing_cell_is_recorded_and_the_study_goes_on(tmp_path, base, synthetic_mnist):
    cells = [Cell("iwae", 1, 0), Cell("iwae", 2, 0)]
    # A file where the first cell's folder should be: that cell cannot write its checkpoint.
    cell_dir(tmp_path, cells[0]).parent.mkdir(parents=True)
    cell_dir(tmp_path, cells[0]).write_text("in the way")

    failed, succeeded = run_study(base, cells, synthetic_mnist, tmp_path)

    assert failed.status == "failed" and failed.metrics is None
    assert failed.error.startswith(("FileExistsError", "NotADirectoryError"))
    assert succeeded.status == "succeeded"


def test_seeds_train_as_one_group_and_each_cell_ends_as_alone(tmp_path, base, synthetic_mnist):
    cells = expand_grid([2], ["iwae", "iwae-dreg"], [0, 1], max_cells=None)

    with mock.patch("models.study.local.train_stacked", wraps=train_stacked) as stacked:
        outcomes = run_study(base, cells, synthetic_mnist, tmp_path / "study")

    configs = stacked.call_args.args[0]
    assert [(c.objective, c.seed) for c in configs] == [(c.objective, c.seed) for c in cells]
    for cell, outcome in zip(cells, outcomes, strict=True):
        alone = train_and_evaluate(
            cell_config(base, cell), synthetic_mnist, tmp_path / "alone" / cell.name
        )
        assert outcome.status == "succeeded"
        assert outcome.metrics["steps"] == alone.metrics["steps"]
        assert math.isclose(
            outcome.metrics["test_loglik"], alone.metrics["test_loglik"], rel_tol=1e-5
        )


def test_a_cell_that_cannot_write_fails_alone_in_its_group(tmp_path, base, synthetic_mnist):
    cells = [Cell("iwae", 2, 0), Cell("iwae", 2, 1)]
    cell_dir(tmp_path, cells[0]).parent.mkdir(parents=True)
    cell_dir(tmp_path, cells[0]).write_text("in the way")

    failed, succeeded = run_study(base, cells, synthetic_mnist, tmp_path)

    assert failed.status == "failed" and "cannot write its checkpoint" in failed.error
    assert succeeded.status == "succeeded" and succeeded.metrics["epochs"] == 1


def test_alpha_reaches_the_vr_iwae_cells_only(tmp_path, base, synthetic_mnist):
    config = base.with_changes(objective="vr-iwae", alpha=0.25, eval_size=0, snr_draws=0)
    outcomes = run_study(
        config, [Cell("vr-iwae", 2, 0), Cell("iwae", 2, 0)], synthetic_mnist, tmp_path
    )
    assert [o.config["alpha"] for o in outcomes] == [0.25, None]


def test_with_a_curve_every_cell_records_one_even_alone_and_the_results_pool_seeds(
    tmp_path, base, synthetic_mnist
):
    base = base.with_changes(epochs=3)
    cells = expand_grid([2], ["iwae"], [0, 1], max_cells=None) + expand_grid(
        [3], ["vae"], [0], max_cells=None
    )  # a group of two seeds, and a cell alone
    curve = CurveSpec(every=2, size=4, k=3)

    outcomes = run_study(base, cells, synthetic_mnist, tmp_path, curve=curve)

    for outcome in outcomes:
        points = outcome.metrics["learning_curve"]
        assert [p["epoch"] for p in points] == [1, 2, 3]
        assert read_curve(cell_dir(tmp_path, outcome.cell) / CURVE_NAME) == points
    # What is on disk is the same study, with nothing trained again.
    assert [o.metrics for o in study_outcomes(base, cells, tmp_path)] == [
        o.metrics for o in outcomes
    ]
    assert study_outcomes(base.with_changes(epochs=4), cells, tmp_path)[0].status == "queued"
    results = study_results(outcomes, {})
    [iwae, vae] = results["learning_curves"]
    assert (iwae["objective"], iwae["k"], iwae["eval_k"], iwae["images"]) == ("iwae", 2, 3, 4)
    assert iwae["epochs"] == [1, 2, 3]
    bounds = [o.metrics["learning_curve"][2]["test_bound"] for o in outcomes[:2]]
    assert iwae["test_bound"][2]["mean"] == pytest.approx(sum(bounds) / 2)
    assert vae["test_bound"][0]["n"] == 1
