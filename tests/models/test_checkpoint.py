"""Tests for models.checkpoint: exact round trips, the safetensors format, atomic writes."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import checkpoint
from models.checkpoint import (
    TrainState,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from models.config import ModelConfig, TrainConfig
from models.files import write_atomic
from models.networks import IWAEModel
from models.objectives import backward, surrogates
from models.training import ADAM_EPS

X = torch.bernoulli(torch.full((5, 6), 0.5), generator=torch.Generator().manual_seed(0))


def make_config(model: ModelConfig) -> TrainConfig:
    """A config with no field left at its default, so that a lost field shows."""
    return TrainConfig(
        k=3,
        objective="miwae",
        m=2,
        beta=0.3,
        epochs=4,
        batch_size=5,
        learning_rate=3e-3,
        schedule="burda",
        model=model,
        train_size=40,
        eval_size=8,
        eval_k=20,
        seed=5,
        device="cpu",
        precision="bf16",
    )


def adam_steps(
    model: IWAEModel, optimizer: torch.optim.Optimizer, generator: torch.Generator, n: int
) -> None:
    config = TrainConfig(k=3)
    for _ in range(n):
        optimizer.zero_grad(set_to_none=True)
        backward(model, surrogates(model, X, config, generator))
        optimizer.step()


class Trained:
    """A float32 tiny model after two Adam steps, with its optimizer and generator."""

    def __init__(self, make_tiny_model: Callable[..., IWAEModel], layers: int = 1) -> None:
        self.model = make_tiny_model(layers, dtype=torch.float32)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=3e-3, eps=ADAM_EPS)
        self.generator = torch.Generator().manual_seed(1)
        adam_steps(self.model, self.optimizer, self.generator, 2)
        self.config = make_config(self.model.config)
        self.state = TrainState(epoch=3, step=17, train_seconds=1.25)

    def save(self, path: Path) -> None:
        save_checkpoint(path, self.model, self.optimizer, self.config, self.state, self.generator)


@pytest.fixture(params=[1, 2], ids=["layers1", "layers2"])
def trained(request: pytest.FixtureRequest, make_tiny_model: Callable[..., IWAEModel]) -> Trained:
    return Trained(make_tiny_model, request.param)


def test_round_trip_is_exact(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    trained.save(path)

    checkpoint = load_checkpoint(path)

    assert checkpoint.config == trained.config
    assert checkpoint.state == trained.state
    expected = trained.model.state_dict()
    assert checkpoint.model_state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(checkpoint.model_state[name], tensor), name
    assert torch.equal(checkpoint.generator_state, trained.generator.get_state())
    saved_optimizer = trained.optimizer.state_dict()
    assert checkpoint.optimizer_state["state"].keys() == saved_optimizer["state"].keys()
    for index, values in saved_optimizer["state"].items():
        assert checkpoint.optimizer_state["state"][index].keys() == values.keys()
        for key, value in values.items():
            assert torch.equal(checkpoint.optimizer_state["state"][index][key], value)
    assert checkpoint.optimizer_state["state"][0]["step"].item() == 2
    group = checkpoint.optimizer_state["param_groups"][0]
    assert (group["lr"], group["eps"], tuple(group["betas"])) == (3e-3, ADAM_EPS, (0.9, 0.999))


def test_restored_run_continues_bit_identically(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    trained.save(path)
    checkpoint = load_checkpoint(path)
    model = IWAEModel(checkpoint.config.model)
    model.load_state_dict(checkpoint.model_state)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, eps=1.0)  # overwritten by the load
    optimizer.load_state_dict(checkpoint.optimizer_state)
    generator = torch.Generator()
    generator.set_state(checkpoint.generator_state)

    adam_steps(trained.model, trained.optimizer, trained.generator, 3)
    adam_steps(model, optimizer, generator, 3)

    restored = model.state_dict()
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(restored[name], tensor), name


def test_the_file_is_safetensors_not_pickle(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    trained.save(path)
    data = path.read_bytes()

    assert data[:1] != b"\x80" and data[:2] != b"PK"  # neither a pickle nor torch.save's zip
    header_size = int.from_bytes(data[:8], "little")  # safetensors: u64 size, JSON header
    header = json.loads(data[8 : 8 + header_size])
    metadata = header.pop("__metadata__")
    assert metadata["format"] == "iwae-checkpoint/1"
    assert TrainConfig.from_dict(json.loads(metadata["config"])) == trained.config
    assert all({"dtype", "shape", "data_offsets"} <= entry.keys() for entry in header.values())
    tensors = load_file(path)
    assert tensors.keys() == header.keys()
    assert any(name.startswith("model.") for name in tensors)
    assert any(name.startswith("optim.") for name in tensors)


def test_unreadable_files_raise_value_error(trained: Trained, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    trained.save(good)
    data = good.read_bytes()
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, other, metadata={"format": "something-else"})
    bad_files = {
        "garbage": b"this is not a checkpoint\n" * 40,
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "header only": data[: 8 + int.from_bytes(data[:8], "little")],
        "pickle": pickle.dumps({"model": [1, 2, 3]}),
        "other safetensors": other.read_bytes(),
    }
    for name, payload in bad_files.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(payload)
        with pytest.raises(ValueError):
            load_checkpoint(path)
        with pytest.raises(ValueError):
            load_model(path)


def test_saving_leaves_no_temporary_files(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "run" / "model.safetensors"  # the folder is created

    trained.save(path)
    trained.state.epoch += 1
    trained.save(path)  # replaces the first one

    assert [p.name for p in path.parent.iterdir()] == ["model.safetensors"]
    assert load_checkpoint(path).state.epoch == 4


def test_a_failed_write_keeps_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file.bin"
    write_atomic(path, b"old")

    def fail(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, b"new")

    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_load_model_gives_the_same_model_in_eval_mode(trained: Trained, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    trained.save(path)

    model, config = load_model(path)

    assert config == trained.config
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    for ours, theirs in (
        (model.log_weights(X, 4, torch.Generator().manual_seed(3)),
         trained.model.log_weights(X, 4, torch.Generator().manual_seed(3))),
        (model.reconstruct(X), trained.model.reconstruct(X)),
        (model.sample(3, torch.Generator().manual_seed(3)),
         trained.model.sample(3, torch.Generator().manual_seed(3))),
    ):  # fmt: skip
        assert torch.equal(ours, theirs)


def test_load_model_reads_no_optimizer_or_generator_tensor(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Serving needs the weights only: Adam's moments are twice their size."""
    path = tmp_path / "model.safetensors"
    trained.save(path)
    read: list[str] = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.file = real_open(*args, **kwargs)

        def __enter__(self) -> Any:
            handle = self.file.__enter__()

            class Handle:
                metadata = handle.metadata
                keys = handle.keys

                @staticmethod
                def get_tensor(name: str) -> torch.Tensor:
                    read.append(name)
                    return handle.get_tensor(name)

            return Handle

        def __exit__(self, *exc: object) -> None:
            self.file.__exit__(*exc)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    load_model(path)
    assert read and all(name.startswith("model.") for name in read)
    load_checkpoint(path)
    assert any(name.startswith("optim.") for name in read)  # the recording sees them
