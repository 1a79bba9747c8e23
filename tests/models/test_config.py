"""Tests for models.config: ModelConfig's and TrainConfig's validation, the defaults they
resolve, Burda's preset and its merge with explicit fields, and the JSON round trip."""

from __future__ import annotations

import pytest

from models.config import ModelConfig, TrainConfig, over_preset, preset_config
from models.training import burda_epochs

# --- ModelConfig ----------------------------------------------------------------------------


def test_model_config_defaults_are_burdas() -> None:
    one, two = ModelConfig(), ModelConfig(layers=2)

    assert (one.layers, one.hidden_dim, one.latent_dim, one.x_dim) == (1, 200, 50, 784)
    assert one.latent_dims == (50,)
    assert (two.hidden_dim, two.latent_dim) == (100, 50)
    assert two.latent_dims == (100, 50)
    assert two.hidden_dims == (100, 50)
    # z1's width and the second block's follow hidden_dim and latent_dim unless given.
    assert ModelConfig(layers=2, hidden_dim=30, latent_dim=5).latent_dims == (30, 5)
    code = ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)
    assert (code.latent_dims, code.hidden_dims) == ((100, 50), (200, 100))
    bad_configs = (
        {"layers": 3},
        {"latent_dim": 0},
        {"hidden_dim": 0},
        {"x_dim": -1},
        {"layers": 2, "z1_dim": 0},
        {"layers": 1, "z1_dim": 100},  # one stochastic layer has no z1 to size
        {"layers": 1, "hidden2_dim": 100},
    )
    for bad in bad_configs:
        with pytest.raises(ValueError):
            ModelConfig(**bad)  # type: ignore[arg-type]


# --- TrainConfig: ranges and options that do not apply --------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"objective": "gan"}, "unknown objective 'gan'"),
        ({"k": 0}, "k must be at least 1"),
        ({"m": 0}, "m must be at least 1"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"eval_k": 0}, "eval_k must be at least 1"),
        ({"beta": 1.5}, r"beta must lie in \[0, 1\]"),
        ({"beta": -0.1}, r"beta must lie in \[0, 1\]"),
        ({"train_size": 0}, "train_size must be positive"),
        ({"eval_size": -1}, "eval_size must be >= 0"),
    ],
)
def test_counts_and_weights_out_of_range_are_refused(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_the_limits_themselves_are_accepted() -> None:
    edge = TrainConfig(k=1, m=1, epochs=1, batch_size=1, eval_k=1, beta=0.0, train_size=1)
    assert (edge.k, edge.m, edge.beta, edge.train_size) == (1, 1, 0.0, 1)
    assert TrainConfig(beta=1.0, eval_size=0).beta == 1.0


def test_snr_draws_is_zero_or_enough_for_the_bias_correction(train_config: TrainConfig) -> None:
    for draws in (0, 8, 1000):
        assert train_config.with_changes(snr_draws=draws).snr_draws == draws
    for draws in (-1, 1, 7):
        with pytest.raises(ValueError, match=r"snr_draws must be 0 \(no SNR\) or at least 8"):
            train_config.with_changes(snr_draws=draws)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"alpha": 0.5}, "alpha applies only"),
        ({"objective": "vr-iwae", "alpha": 1.0}, r"alpha must lie in \[0, 1\)"),
        ({"objective": "vr-iwae-dreg", "alpha": -0.1}, "alpha must lie"),
        ({"k_min": 2}, "k_min applies only"),
        ({"k_schedule": "linear", "ess_target": 0.3}, "ess_target applies only"),
        ({"k_schedule": "linear", "k_min": 6, "k": 5}, "k_min must lie"),
        ({"k_schedule": "ess", "k_min": 0}, "k_min must lie"),
        ({"k_schedule": "ess", "ess_target": 1.0}, "ess_target must lie"),
        ({"k_schedule": "cosine"}, "unknown k_schedule"),
    ],
)
def test_options_that_do_not_apply_or_are_out_of_range_are_refused(
    changes: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_defaults_are_resolved_and_travel_with_the_config() -> None:
    vr = TrainConfig(objective="vr-iwae", k_schedule="ess")

    assert (vr.alpha, vr.k_min, vr.ess_target) == (0.5, 1, 0.15)
    assert TrainConfig.from_dict(vr.to_dict()) == vr
    plain = TrainConfig()
    assert (plain.alpha, plain.k_schedule, plain.k_min, plain.ess_target) == (
        None,
        "fixed",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"missing_rate": -0.1}, "missing_rate"),
        ({"missing_rate": 0.91}, "missing_rate"),
        ({"missing_pattern": "left-half"}, "missing_pattern"),
        ({"missing_pattern": "random-square", "model": ModelConfig(x_dim=6)}, "square"),
    ],
)
def test_config_refuses_bad_missing_data_options(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_config_round_trips_the_missing_data_options() -> None:
    config = TrainConfig(missing_rate=0.5, missing_pattern="top-half")

    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig().missing_rate == 0.0  # complete images unless asked


# --- Burda's preset -------------------------------------------------------------------------


def test_burda_preset_and_explicit_fields_over_it() -> None:
    config = preset_config("burda", k=50)

    assert (config.batch_size, config.init, config.schedule) == (20, "burda", "burda")
    assert config.epochs == burda_epochs() == 3280
    assert (config.eval_size, config.eval_k, config.k) == (10_000, 5000, 50)
    # Explicit fields win, whatever their value; no preset is the plain defaults.
    assert preset_config("burda", k=50, batch_size=100, epochs=3).batch_size == 100
    assert preset_config("burda", k=50, batch_size=100, epochs=3).epochs == 3
    assert preset_config(None, k=5) == TrainConfig(k=5)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("kingma", k=5)  # type: ignore[arg-type]


def test_the_preset_wins_over_defaults_that_were_not_given() -> None:
    """With `given`, the other fields are defaults: the preset's values win over them, and a
    field given explicitly wins over the preset even when it equals the default."""
    defaults = {"k": 50, "batch_size": 100, "epochs": 1}

    merged = preset_config("burda", given={"k"}, **defaults)
    assert (merged.k, merged.batch_size, merged.epochs) == (50, 20, 3280)
    merged = preset_config("burda", given={"k", "batch_size"}, **defaults)
    assert (merged.batch_size, merged.epochs) == (100, 3280)
    assert over_preset("burda", defaults, given={"k"}) == {"k": 50}
    assert over_preset(None, defaults, given=()) == defaults


def test_flat_model_fields_build_the_model_config() -> None:
    code = preset_config(None, k=5, layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)

    assert code.model == ModelConfig(layers=2, hidden_dim=200, z1_dim=100, hidden2_dim=100)
    assert preset_config(None, k=5, latent_dim=10).model == ModelConfig(latent_dim=10)
    assert preset_config(None, k=5).model == ModelConfig()


# --- the JSON round trip and changes --------------------------------------------------------


def test_records_from_before_init_existed_read_as_torch_init(train_config: TrainConfig) -> None:
    old = train_config.to_dict()
    del old["init"]
    old["model"] = {k: v for k, v in old["model"].items() if k not in ("z1_dim", "hidden2_dim")}

    assert TrainConfig.from_dict(old) == train_config.with_changes(init="torch")
    with pytest.raises(ValueError, match="unknown init"):
        train_config.with_changes(init="xavier")


def test_from_dict_rebuilds_the_model_and_refuses_unknown_fields() -> None:
    config = TrainConfig(k=5, model=ModelConfig(layers=2, hidden_dim=30, latent_dim=5))
    record = config.to_dict()

    assert record["model"] == {
        "layers": 2,
        "latent_dim": 5,
        "hidden_dim": 30,
        "x_dim": 784,
        "z1_dim": 30,
        "hidden2_dim": 5,
    }
    assert TrainConfig.from_dict(record) == config
    with pytest.raises(ValueError, match=r"unknown TrainConfig fields: \['learning_rte'\]"):
        TrainConfig.from_dict({**record, "learning_rte": 0.01})


def test_with_changes_gives_a_new_checked_config() -> None:
    config = TrainConfig(k=5)

    assert config.with_changes(k=7, seed=3) == TrainConfig(k=7, seed=3)
    assert config.k == 5
    with pytest.raises(ValueError, match="k must be at least 1"):
        config.with_changes(k=0)
