"""Planning before a job is queued (app.planning): the compute budget, the job's config from
POST /train's body, and a study's cells; each refusal is a 422 naming what to change."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from app.planning import check_budget, study_plan, train_config
from app.schemas import StudyRequest, TrainRequest
from models.config import TrainConfig

PER_STEP = {
    "type": "compute_budget",
    "loc": ("body",),
    "msg": "the job asks for k*m*batch_size = 6*1*20 = 120 importance samples per training "
    "step, more than IWAE_MAX_SAMPLES_PER_STEP = 100; lower k, m or batch_size",
    "input": 120,
    "ctx": {"cost": "samples_per_step", "limit": 100, "setting": "IWAE_MAX_SAMPLES_PER_STEP"},
}


def config(**fields: Any) -> TrainConfig:
    base = {"k": 5, "batch_size": 20, "epochs": 1, "train_size": 100, "device": "cpu"}
    return TrainConfig(**{**base, **fields})


def refusal(call: Callable[[], object]) -> list[dict[str, Any]]:
    with pytest.raises(RequestValidationError) as info:
        call()
    return list(info.value.errors())


# Burda's one-layer model: multiply-adds per image and per importance sample.
IMAGE_MACS, SAMPLE_MACS = 216_800, 206_800
STEP_FLOPS = 6 * (20 * IMAGE_MACS + 100 * SAMPLE_MACS)  # config(): batch 20, k 5
TRAIN_FLOPS = 6 * 1 * 100 * (IMAGE_MACS + 5 * SAMPLE_MACS)  # 1 epoch of 100 images


def test_a_run_at_the_limits_passes(make_settings: Callable[..., Any]) -> None:
    # 5*20 = 100 samples per step, and the FLOPs of config() exactly: limits are inclusive.
    settings = make_settings(
        max_samples_per_step=100, max_step_flops=STEP_FLOPS, max_train_flops=TRAIN_FLOPS
    )
    check_budget(config(), settings)


def test_one_sample_per_step_too_many_is_refused_naming_cost_and_setting(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(max_samples_per_step=100)
    assert refusal(lambda: check_budget(config(k=6), settings)) == [PER_STEP]


def test_a_run_over_every_budget_gets_every_error(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(
        max_samples_per_step=100, max_step_flops=STEP_FLOPS, max_train_flops=TRAIN_FLOPS
    )
    errors = refusal(lambda: check_budget(config(k=6, epochs=2), settings))
    assert [e["ctx"]["setting"] for e in errors] == [
        "IWAE_MAX_SAMPLES_PER_STEP",
        "IWAE_MAX_STEP_FLOPS",
        "IWAE_MAX_TRAIN_FLOPS",
    ]
    assert errors[2]["input"] == 6 * 2 * 100 * (IMAGE_MACS + 6 * SAMPLE_MACS)
    assert (
        "6*epochs*images*(image_macs + k*m*sample_macs) = 6*2*100*(216800 + 6*206800)"
        in (errors[2]["msg"])
    )


def test_grouped_objectives_count_m_groups(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(max_samples_per_step=399)
    errors = refusal(lambda: check_budget(config(objective="miwae", m=4), settings))
    assert errors[0]["input"] == 5 * 4 * 20


def test_train_config_is_the_body_s_config_within_the_budget(
    make_settings: Callable[..., Any],
) -> None:
    body = TrainRequest(k=5, epochs=1, batch_size=20, train_size=100)
    assert train_config(body, make_settings()) == TrainConfig.from_dict(body.to_config())
    refused = refusal(lambda: train_config(body, make_settings(max_samples_per_step=99)))
    assert refused[0]["ctx"]["setting"] == "IWAE_MAX_SAMPLES_PER_STEP"


def test_a_study_plan_has_one_config_per_cell_and_the_largest_k_in_its_base(
    make_settings: Callable[..., Any],
) -> None:
    body = StudyRequest(ks=[1, 5], objectives=["vae", "iwae"], seeds=[0, 1], epochs=1)
    plan = study_plan(body, make_settings())
    cells = [(c.objective, c.k, c.seed) for c in plan.cells]
    assert cells == [
        ("vae", 1, 0),
        ("vae", 1, 1),
        ("vae", 5, 0),
        ("vae", 5, 1),
        ("iwae", 1, 0),
        ("iwae", 1, 1),
        ("iwae", 5, 0),
        ("iwae", 5, 1),
    ]
    for cell in plan.cells:
        assert (cell.config["objective"], cell.config["k"]) == (cell.objective, cell.k)
        assert (cell.config["seed"], cell.config["epochs"]) == (cell.seed, 1)
    assert (plan.config.k, plan.config.snr_draws) == (5, body.snr_draws)


def test_alpha_makes_a_vr_objective_the_base_s(make_settings: Callable[..., Any]) -> None:
    body = StudyRequest(ks=[2], objectives=["iwae", "vr-iwae"], alpha=0.5, epochs=1)
    plan = study_plan(body, make_settings())
    assert plan.config.objective == "vr-iwae"
    assert [c.config["alpha"] for c in plan.cells if c.objective == "vr-iwae"] == [0.5]


def test_a_grid_over_the_cell_limit_is_a_study_grid_error(
    make_settings: Callable[..., Any],
) -> None:
    body = StudyRequest(ks=[1, 2], objectives=["vae", "iwae"], seeds=[0])
    errors = refusal(lambda: study_plan(body, make_settings(max_study_jobs=3)))
    assert [(e["type"], e["loc"]) for e in errors] == [("study_grid", ("body",))]


def test_a_cell_over_the_budget_refuses_the_whole_study(
    make_settings: Callable[..., Any],
) -> None:
    body = StudyRequest(ks=[1, 50], objectives=["iwae"], batch_size=20, epochs=1)
    errors = refusal(lambda: study_plan(body, make_settings(max_samples_per_step=999)))
    assert [(e["type"], e["input"]) for e in errors] == [("compute_budget", 50 * 20)]
