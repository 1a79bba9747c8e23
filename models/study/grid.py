"""The grid of a K study: one training run (a cell) per objective, K and seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.config import MAX_K, MAX_SEED, OBJECTIVES, VR_OBJECTIVES, TrainConfig

MAX_KS = 12
MAX_SEEDS = 10
# Gradient draws per cell: enough for the bias-corrected SNR summaries of 20 images.
STUDY_SNR_DRAWS = 100
# The fields of a TrainConfig that the grid sets per cell.
CELL_FIELDS = ("objective", "k", "seed")


@dataclass(frozen=True)
class Cell:
    """One run of a study: `objective` trained with `k` importance samples from `seed`."""

    objective: str
    k: int
    seed: int

    @property
    def name(self) -> str:
        """Unique within a study, and safe in file names and URLs: "iwae-k50-s0"."""
        return f"{self.objective}-k{self.k}-s{self.seed}"


class StudyGridError(ValueError):
    """A grid that cannot be run; the message names the field and says why."""


def expand_grid(
    ks: Sequence[int], objectives: Sequence[str], seeds: Sequence[int], max_cells: int | None
) -> list[Cell]:
    """Every (objective, k, seed), objective-major, then k, then seed, in the given orders.

    ks: 1 to `MAX_KS` distinct values in [1, `MAX_K`]; objectives: distinct training
    objectives; seeds: 1 to `MAX_SEEDS` distinct values in [0, `MAX_SEED`]; at most
    `max_cells` cells in all (None: no limit but those).
    """
    _check_list("ks", ks, MAX_KS)
    _check_list("objectives", objectives, len(OBJECTIVES))
    _check_list("seeds", seeds, MAX_SEEDS)
    for k in ks:
        if not 1 <= k <= MAX_K:
            raise StudyGridError(f"ks: {k} is outside [1, {MAX_K}]")
    for objective in objectives:
        if objective not in OBJECTIVES:
            raise StudyGridError(f"objectives: unknown {objective!r}; choose from {OBJECTIVES}")
    for seed in seeds:
        if not 0 <= seed <= MAX_SEED:
            raise StudyGridError(f"seeds: {seed} is outside [0, {MAX_SEED}]")
    cells = len(ks) * len(objectives) * len(seeds)
    if max_cells is not None and cells > max_cells:
        raise StudyGridError(
            f"ks x objectives x seeds: {len(ks)} x {len(objectives)} x {len(seeds)} = {cells} "
            f"cells, more than the {max_cells} allowed"
        )
    return [Cell(o, k, s) for o in objectives for k in ks for s in seeds]


def _check_list(field: str, values: Sequence[object], most: int) -> None:
    if not values:
        raise StudyGridError(f"{field}: give at least one value")
    if len(values) > most:
        raise StudyGridError(f"{field}: at most {most} values, got {len(values)}")
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise StudyGridError(f"{field}: repeated {', '.join(repeated)}")


def base_cell(
    ks: Sequence[int], objectives: Sequence[str], seeds: Sequence[int], alpha: float | None
) -> dict[str, Any]:
    """The grid's fields of the config every cell starts from (`cell_config`'s `base`): the
    largest K, so that `k_min` is checked against it, the first seed, and the first
    objective, or the grid's first VR-IWAE objective when an `alpha` is given (the others
    refuse one)."""
    objective = objectives[0]
    if alpha is not None:
        objective = next((o for o in objectives if o in VR_OBJECTIVES), objective)
    return {"k": max(ks), "objective": objective, "seed": seeds[0]}


def cell_config(base: TrainConfig, cell: Cell) -> TrainConfig:
    """`base` with the cell's objective, K and seed.

    `base.alpha` goes to the VR-IWAE objectives only (the others refuse an alpha), so one
    base serves a grid that mixes them. A combination the config refuses (say `k_min`
    above the cell's K) raises `StudyGridError`.
    """
    alpha = base.alpha if cell.objective in VR_OBJECTIVES else None
    try:
        return base.with_changes(objective=cell.objective, k=cell.k, seed=cell.seed, alpha=alpha)
    except ValueError as exc:
        raise StudyGridError(f"cell {cell.name}: {exc}") from exc


def shared_config(base: TrainConfig) -> dict[str, Any]:
    """The options every cell shares: `base` as a dict without the `CELL_FIELDS`."""
    return {name: v for name, v in base.to_dict().items() if name not in CELL_FIELDS}
