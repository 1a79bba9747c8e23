"""One source per training option: every field of POST /train is a TrainConfig field, an
`iwae train` option and an entry of the README's `iwae train` line, and nothing is in one
of them only. Each exception is named here with its reason."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from app.cli import build_parser
from app.schemas import TrainRequest
from models.config import MODEL_FIELDS, ModelConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# TrainConfig fields that a request does not set: the service's workers choose the device.
NOT_REQUESTED = {"device"}
# Request fields that are no TrainConfig field: the preset is merged into the config.
NOT_CONFIG = {"preset"}
# `iwae train` options that set no field, and the one named otherwise than its field.
CLI_ONLY = {"--out", "--help"}
CLI_NAMES = {"learning_rate": "--lr"}


def config_fields() -> set[str]:
    """TrainConfig's fields with the model's flat, as requests and options give them."""
    return {f.name for f in fields(TrainConfig) if f.name != "model"} | set(MODEL_FIELDS)


def train_options() -> set[str]:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    train = commands.choices["train"]
    return {flag for action in train._actions for flag in action.option_strings if "--" in flag}


def readme_train_options() -> set[str]:
    [line] = [x for x in (ROOT / "README.md").read_text().splitlines() if "`iwae train --" in x]
    return set(re.findall(r"--[a-z0-9-]+", line.split("` |")[0]))


def test_the_model_fields_are_the_model_config_but_mnist_s_x_dim() -> None:
    assert set(MODEL_FIELDS) == {f.name for f in fields(ModelConfig)} - {"x_dim"}


def test_every_request_field_is_a_config_field_and_back() -> None:
    assert set(TrainRequest.model_fields) - NOT_CONFIG == config_fields() - NOT_REQUESTED


def test_every_config_field_is_an_option_and_back() -> None:
    expected = {CLI_NAMES.get(n, "--" + n.replace("_", "-")) for n in config_fields() | NOT_CONFIG}
    assert train_options() - CLI_ONLY == expected


def test_the_readme_lists_every_option_of_iwae_train() -> None:
    assert readme_train_options() == train_options() - {"--help"}
