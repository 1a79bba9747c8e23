"""The K study: one trained run per K, with its measurements, reusing finished runs."""

from __future__ import annotations

import math

from models.study.local import run_study


def test_study_trains_once_per_k_and_measures_each(tmp_path, train_config, synthetic_mnist):
    config = train_config.with_changes(eval_size=5, epochs=1)
    rows = run_study(config, [1, 4], synthetic_mnist, tmp_path, snr_draws=8, snr_batch=3)

    assert [r.k for r in rows] == [1, 4]
    for row in rows:
        assert (tmp_path / f"k{row.k}" / "model.safetensors").is_file()
        assert row.test_loglik < 0
        assert row.test_loglik_std_error >= 0
        assert len(row.active_units) == config.model.layers
        assert math.isfinite(row.snr_encoder) and row.snr_encoder >= 0
        assert math.isfinite(row.snr_decoder) and row.snr_decoder >= 0
        assert sorted(row.imputation["model"]) == sorted({"1", str(row.k)})
    # K changes the bound, so the two runs must not be the same model.
    assert rows[0].test_loglik != rows[1].test_loglik


def test_study_reuses_finished_runs(tmp_path, train_config, synthetic_mnist):
    config = train_config.with_changes(epochs=1)
    first = run_study(config, [2], synthetic_mnist, tmp_path, snr_draws=8)
    checkpoint = tmp_path / "k2" / "model.safetensors"
    written = checkpoint.stat().st_mtime_ns
    again = run_study(config, [2], synthetic_mnist, tmp_path, snr_draws=8)

    assert checkpoint.stat().st_mtime_ns == written  # not retrained
    assert again[0].train_seconds == first[0].train_seconds


def test_a_stopping_callback_stops_the_study(tmp_path, train_config, synthetic_mnist):
    rows = run_study(train_config, [1, 2], synthetic_mnist, tmp_path, callbacks=[lambda p: True])
    assert rows is None
    assert not (tmp_path / "k2").exists()


def test_alphas_are_one_more_grid_axis(tmp_path, train_config, synthetic_mnist):
    config = train_config.with_changes(objective="vr-iwae", eval_size=5, epochs=1)
    rows = run_study(
        config, [2, 4], synthetic_mnist, tmp_path, alphas=[0.0, 0.5], snr_draws=8, snr_batch=3
    )

    assert [(r.alpha, r.k) for r in rows] == [(0.0, 2), (0.0, 4), (0.5, 2), (0.5, 4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "alpha0-k2",
        "alpha0-k4",
        "alpha0.5-k2",
        "alpha0.5-k4",
    ]
    # alpha changes the objective, so the same K gives another model.
    assert rows[0].test_loglik != rows[2].test_loglik
