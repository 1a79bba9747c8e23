"""Checkpoints: one safetensors file holding weights, optimizer state, RNG state and config.

safetensors stores tensors and a string-to-string metadata map only, so loading a checkpoint
never unpickles code. Writes are atomic (temporary file, fsync, rename), so a crash leaves
either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from models.config import TrainConfig
from models.files import Write, write_atomic
from models.networks import IWAEModel

_FORMAT = "iwae-checkpoint/1"


@dataclass
class TrainState:
    """Where training stands: epochs and steps completed, training wall time so far.

    `k` is the K of the next epoch (None before the first), `k_history` the K each completed
    epoch used, `ess_history` the held-out ESS/K measured after each (`ess` schedule only).
    """

    epoch: int = 0
    step: int = 0
    train_seconds: float = 0.0
    k: int | None = None
    k_history: list[int] = field(default_factory=list)
    ess_history: list[float] = field(default_factory=list)


@dataclass
class Checkpoint:
    config: TrainConfig
    state: TrainState
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    generator_state: torch.Tensor


def save_checkpoint(
    path: Path,
    model: IWAEModel,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    state: TrainState,
    generator: torch.Generator,
    *,
    write: Write = write_atomic,
) -> None:
    """Write everything a resumed run needs to `path`, atomically (through `write`)."""
    tensors = {f"model.{name}": t.detach().cpu() for name, t in model.state_dict().items()}
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.generator"] = generator.get_state().cpu()
    metadata = {
        "format": _FORMAT,
        "config": json.dumps(config.to_dict()),
        "state": json.dumps(asdict(state)),
        "optim_param_groups": json.dumps(optim["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    write(Path(path), save(tensors, metadata=metadata))


def _read(
    path: Path, device: str | torch.device, prefix: str = ""
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The checkpoint's metadata and its tensors whose names start with `prefix`."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            names = [name for name in f.keys() if name.startswith(prefix)]  # noqa: SIM118
            tensors = {name: f.get_tensor(name) for name in names}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path} is not a readable checkpoint: {exc}") from exc
    if metadata.get("format") != _FORMAT:
        raise ValueError(f"{path} is not an iwae checkpoint (format {metadata.get('format')!r})")
    return metadata, tensors


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; tensors land on `device`."""
    metadata, tensors = _read(path, device)
    optimizer_state: dict[str, Any] = {
        "state": {},
        "param_groups": json.loads(metadata["optim_param_groups"]),
    }
    for index, values in json.loads(metadata["optim_scalars"]).items():
        optimizer_state["state"].setdefault(int(index), {}).update(values)
    model_state = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "model":
            model_state[rest] = tensor
        elif kind == "optim":
            index, _, key = rest.partition(".")
            # Adam keeps `step` on the CPU unless it runs capturable/fused.
            value = tensor.cpu() if key == "step" else tensor
            optimizer_state["state"].setdefault(int(index), {})[key] = value
    return Checkpoint(
        config=TrainConfig.from_dict(json.loads(metadata["config"])),
        state=TrainState(**json.loads(metadata["state"])),
        model_state=model_state,
        optimizer_state=optimizer_state,
        generator_state=tensors["rng.generator"].cpu(),
    )


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[IWAEModel, TrainConfig]:
    """The trained model in eval mode on `device`, with the config it was trained with.

    Reads the model's tensors only: Adam's two moments (twice the model's size) and the
    random stream stay on disk, since serving needs none of them.
    """
    metadata, tensors = _read(path, device, prefix="model.")
    model_state = {name.removeprefix("model."): tensor for name, tensor in tensors.items()}
    config = TrainConfig.from_dict(json.loads(metadata["config"]))
    model = IWAEModel(config.model).to(device)
    model.load_state_dict(model_state)
    return model.eval(), config
