"""Planning a training run before it is queued: its config from the request, within the
server's compute budget, and a study's grid of cells with each cell's config.

The costs are `models.cost.train_cost`, the grid `models.study.grid`; this module turns
their refusals into the request's 422 (`RequestValidationError`), naming the field, the
cost and the setting that limits it. A study's cells whose training steps share a shape
are grouped (`models.stacked.stack_groups`) to train stacked in one worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.deps import SettingsDep
from app.schemas import StudyRequest, TrainRequest
from app.settings import Settings
from models.config import TrainConfig
from models.cost import train_cost
from models.stacked import stack_groups
from models.study.grid import base_cell, cell_config, expand_grid
from worker.jobs import GridPoint


@dataclass(frozen=True)
class _Budget:
    cost: str  # the `TrainCost` property
    setting: str
    formula: str
    what: str
    knobs: str


_BUDGETS = (
    _Budget(
        "samples_per_step",
        "IWAE_MAX_SAMPLES_PER_STEP",
        "k*m*batch_size = {c.k}*{c.groups}*{c.batch_size}",
        "importance samples per training step",
        "k, m or batch_size",
    ),
    _Budget(
        "step_flops",
        "IWAE_MAX_STEP_FLOPS",
        "6*(batch*image_macs + k*m*batch*sample_macs) = "
        "6*({c.batch_size}*{c.image_macs} + {c.samples_per_step}*{c.sample_macs})",
        "FLOPs per training step",
        "k, m, batch_size or the network's widths",
    ),
    _Budget(
        "train_flops",
        "IWAE_MAX_TRAIN_FLOPS",
        "6*epochs*images*(image_macs + k*m*sample_macs) = "
        "6*{c.epochs}*{c.images}*({c.image_macs} + {c.samples_per_image}*{c.sample_macs})",
        "FLOPs in the whole run",
        "epochs, train_size, k, m or the network's widths",
    ),
)


def check_budget(config: TrainConfig, settings: Settings) -> None:
    """422 when a training run asks for more than the settings allow: importance samples
    per step (its memory, IWAE_MAX_SAMPLES_PER_STEP), FLOPs per step (IWAE_MAX_STEP_FLOPS)
    or FLOPs in all (its time, IWAE_MAX_TRAIN_FLOPS). For every route that queues training."""
    cost = train_cost(config)
    errors = []
    for budget in _BUDGETS:
        value = getattr(cost, budget.cost)
        limit = getattr(settings, budget.setting.removeprefix("IWAE_").lower())
        if value > limit:
            errors.append(
                {
                    "type": "compute_budget",
                    "loc": ("body",),
                    "msg": f"the job asks for {budget.formula.format(c=cost)} = {value:,} "
                    f"{budget.what}, more than {budget.setting} = {limit:,}; "
                    f"lower {budget.knobs}",
                    "input": value,
                    "ctx": {"cost": budget.cost, "limit": limit, "setting": budget.setting},
                }
            )
    if errors:
        raise RequestValidationError(errors)


def train_config(body: TrainRequest, settings: SettingsDep) -> TrainConfig:
    """The job's config from the request body, within the compute budget (422 otherwise)."""
    config = TrainConfig.from_dict(body.to_config())
    check_budget(config, settings)
    return config


@dataclass(frozen=True)
class StudyPlan:
    """A study to create: its base config, every cell with its job's config, and the cells'
    stack groups (indices into `cells`), each queued as one message for one worker."""

    config: TrainConfig
    cells: list[GridPoint]
    groups: list[list[int]]


def study_plan(body: StudyRequest, settings: SettingsDep) -> StudyPlan:  # type: ignore[valid-type]
    """The study's grid and each cell's config (422 for a grid `expand_grid` refuses, a
    combination of options that a cell's config refuses, or a cell over the compute budget).
    """
    try:
        grid = expand_grid(body.ks, body.objectives, body.seeds, settings.max_study_jobs)
        base = _base_config(body)
        configs = [cell_config(base, cell) for cell in grid]
    except ValidationError as exc:  # options that the grid's objectives refuse (alpha, ...)
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from exc
    except ValueError as exc:  # StudyGridError, or a TrainConfig refusing snr_draws
        raise RequestValidationError(
            [{"type": "study_grid", "loc": ("body",), "msg": str(exc), "input": None}]
        ) from exc
    for config in configs:
        check_budget(config, settings)
    cells = [
        GridPoint(cell.objective, cell.k, cell.seed, config.to_dict())
        for cell, config in zip(grid, configs, strict=True)
    ]
    return StudyPlan(base, cells, stack_groups(configs))


def _base_config(body: StudyRequest) -> TrainConfig:  # type: ignore[valid-type]
    """The config every cell starts from: the request's POST /train fields, with the largest
    K (so k_min is checked against it) and an objective that takes the request's alpha."""
    fields = body.model_dump(exclude_unset=True, include=set(TrainRequest.model_fields))
    grid = base_cell(body.ks, body.objectives, body.seeds, body.alpha)
    request = TrainRequest(**fields, **grid)
    base = TrainConfig.from_dict(request.to_config())
    return base.with_changes(snr_draws=body.snr_draws)
