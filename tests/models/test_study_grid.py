"""The grid of a study: its order, its limits, and each cell's config."""

from __future__ import annotations

import pytest

from models.config import MAX_SEED, TrainConfig
from models.study.grid import Cell, StudyGridError, cell_config, expand_grid


def test_the_grid_is_objective_major_then_k_then_seed():
    cells = expand_grid([50, 1], ["iwae", "vae"], [1, 0], max_cells=8)

    assert [(c.objective, c.k, c.seed) for c in cells] == [
        ("iwae", 50, 1),
        ("iwae", 50, 0),
        ("iwae", 1, 1),
        ("iwae", 1, 0),
        ("vae", 50, 1),
        ("vae", 50, 0),
        ("vae", 1, 1),
        ("vae", 1, 0),
    ]
    assert cells[0].name == "iwae-k50-s1"
    assert len({c.name for c in cells}) == len(cells)


def test_the_largest_allowed_grid_expands():
    cells = expand_grid(list(range(4989, 5001)), ["vae"], list(range(10)), max_cells=120)
    assert len(cells) == 120
    assert expand_grid([1], ["vr-iwae-dreg"], [MAX_SEED], max_cells=1)[0].seed == MAX_SEED


@pytest.mark.parametrize(
    ("ks", "objectives", "seeds", "max_cells", "message"),
    [
        ([], ["vae"], [0], 10, "ks: give at least one value"),
        ([1], [], [0], 10, "objectives: give at least one value"),
        ([1], ["vae"], [], 10, "seeds: give at least one value"),
        ([1, 5, 1], ["vae"], [0], 10, "ks: repeated 1"),
        ([1], ["iwae", "iwae"], [0], 10, "objectives: repeated iwae"),
        ([1], ["vae"], [3, 3], 10, "seeds: repeated 3"),
        ([0], ["vae"], [0], 10, "ks: 0 is outside [1, 5000]"),
        ([5001], ["vae"], [0], 10, "ks: 5001 is outside"),
        (list(range(1, 14)), ["vae"], [0], 100, "ks: at most 12 values, got 13"),
        ([1], ["vae"], list(range(11)), 100, "seeds: at most 10 values, got 11"),
        ([1], ["vae"], [-1], 10, "seeds: -1 is outside"),
        ([1], ["vae"], [MAX_SEED + 1], 10, "seeds: 9223372036854775808 is outside"),
        ([1], ["wake-sleep"], [0], 10, "objectives: unknown 'wake-sleep'"),
        ([1, 5, 50], ["vae", "iwae"], [0, 1], 11, "3 x 2 x 2 = 12 cells, more than the 11 allowed"),
    ],
)
def test_a_bad_grid_names_the_field_and_the_reason(ks, objectives, seeds, max_cells, message):
    with pytest.raises(StudyGridError, match=message.replace("[", r"\[")):
        expand_grid(ks, objectives, seeds, max_cells=max_cells)


def test_a_grid_error_is_a_value_error():
    assert issubclass(StudyGridError, ValueError)


def test_a_cell_config_is_the_base_with_the_cells_objective_k_and_seed():
    base = TrainConfig(k=7, objective="iwae", seed=3, epochs=4, learning_rate=3e-4)
    config = cell_config(base, Cell("vae", 50, 1))
    assert config == base.with_changes(objective="vae", k=50, seed=1)


def test_alpha_goes_to_the_vr_objectives_only():
    base = TrainConfig(objective="vr-iwae", alpha=0.2)
    assert cell_config(base, Cell("vr-iwae-dreg", 5, 0)).alpha == 0.2
    assert cell_config(base, Cell("iwae", 5, 0)).alpha is None
    # A base without a VR objective gives them the default alpha.
    assert cell_config(TrainConfig(), Cell("vr-iwae", 5, 0)).alpha == 0.5


def test_a_cell_the_config_refuses_is_a_grid_error_naming_the_cell():
    base = TrainConfig(k=50, k_schedule="linear", k_min=5)
    assert cell_config(base, Cell("iwae", 5, 0)).k_min == 5
    with pytest.raises(StudyGridError, match=r"cell iwae-k1-s0: k_min must lie in \[1, k=1\]"):
        cell_config(base, Cell("iwae", 1, 0))
