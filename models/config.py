"""Configuration dataclasses that travel with every checkpoint.

A model is rebuilt from its checkpoint alone: `ModelConfig` and `TrainConfig` are saved as
JSON next to the weights (see `models.checkpoint`) and read back with `from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

Objective = Literal[
    "vae", "iwae", "iwae-stl", "iwae-dreg", "miwae", "ciwae", "piwae", "vr-iwae", "vr-iwae-dreg"
]
Schedule = Literal["constant", "burda"]
KSchedule = Literal["fixed", "linear", "ess"]
Precision = Literal["fp32", "tf32", "bf16"]
Device = Literal["auto", "cpu", "cuda"]
Init = Literal["burda", "torch"]
Preset = Literal["burda"]
MissingPattern = Literal["mcar", "top-half", "random-square"]

OBJECTIVES: tuple[str, ...] = get_args(Objective)
K_SCHEDULES: tuple[str, ...] = get_args(KSchedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICES: tuple[str, ...] = get_args(Device)
# Objectives of the VR-IWAE family, the only ones that take `alpha`, and its default.
VR_OBJECTIVES = ("vr-iwae", "vr-iwae-dreg")
DEFAULT_ALPHA = 0.5
DEFAULT_K_MIN = 1
# About ESS/K of 50 samples on MNIST in the first epochs (see models.k_schedule).
DEFAULT_ESS_TARGET = 0.15
MISSING_PATTERNS: tuple[str, ...] = get_args(MissingPattern)
# The largest K a job trains (`k`, `k_min`) or evaluates (`eval_k`) with, and a study's cells.
MAX_K = 5000
# torch.Generator.manual_seed takes any unsigned 64-bit value; JSON clients a signed one.
MAX_SEED = 2**63 - 1
# Fewer draws give no bias-corrected SNR (see models.snr.SNRAccumulator).
MIN_SNR_DRAWS = 8
# Above 90% missing, too little of each image is left to learn from.
MAX_MISSING_RATE = 0.9

# The `ModelConfig` fields a request or a command line sets (flat, beside the TrainConfig
# fields); `x_dim` is MNIST's 784.
MODEL_FIELDS: tuple[str, ...] = ("layers", "latent_dim", "hidden_dim", "z1_dim", "hidden2_dim")

# Burda et al. (2015), section 5: hidden width per architecture when none is given.
_DEFAULT_HIDDEN = {1: 200, 2: 100}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of Burda et al.'s MNIST models.

    One stochastic layer: x -[h, h]-> z (d), tanh, with h=200 and d=50 by default.
    Two stochastic layers: x -[h, h]-> z1 (d1) -[h2, h2]-> z2 (d), with h = `hidden_dim`,
    d1 = `z1_dim` and h2 = `hidden2_dim`; the generative path mirrors the inference path.
    The default is the network of the paper's section 5, 784-100-100-100 then 100-50-50-50
    (h=100, d1=h, h2=d=50). The authors' code (yburda/iwae `experiments.py`) trained a
    wider one, 784-200-200-100 then 100-100-100-50: `hidden_dim=200, z1_dim=100,
    hidden2_dim=100`. The defaults of `z1_dim` and `hidden2_dim` (h and d) keep every
    checkpoint written before they existed loadable unchanged.
    """

    layers: Literal[1, 2] = 1
    latent_dim: int = 50
    hidden_dim: int | None = None  # None: Burda's width for `layers` (200 or 100)
    x_dim: int = 784
    z1_dim: int | None = None  # layers=2 only; None: hidden_dim
    hidden2_dim: int | None = None  # layers=2 only; None: latent_dim

    def __post_init__(self) -> None:
        if self.layers not in (1, 2):
            raise ValueError(f"layers must be 1 or 2, got {self.layers}")
        if self.hidden_dim is None:
            object.__setattr__(self, "hidden_dim", _DEFAULT_HIDDEN[self.layers])
        if self.layers == 1:
            if self.z1_dim is not None or self.hidden2_dim is not None:
                raise ValueError("z1_dim and hidden2_dim need layers=2")
        else:
            if self.z1_dim is None:
                object.__setattr__(self, "z1_dim", self.hidden_dim)
            if self.hidden2_dim is None:
                object.__setattr__(self, "hidden2_dim", self.latent_dim)
        for name in ("latent_dim", "hidden_dim", "x_dim", "z1_dim", "hidden2_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive")

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """Width of each stochastic layer, bottom (nearest x) first."""
        if self.layers == 1:
            return (self.latent_dim,)
        return (self.z1_dim, self.latent_dim)

    @property
    def hidden_dims(self) -> tuple[int, ...]:
        """Width of the two deterministic layers of each block, bottom first."""
        if self.layers == 1:
            return (self.hidden_dim,)
        return (self.hidden_dim, self.hidden2_dim)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run, so that it can be resumed or repeated.

    `k` is the number of importance samples per group; `miwae` and `piwae` draw `m` groups
    of `k` (Rainforth et al., 2018), `ciwae` mixes ELBO and IWAE with weight `beta` on the
    ELBO. `train_size=None` uses all 60,000 training images; `eval_size=0` skips the final
    test log-likelihood, which uses `eval_k` importance samples and always runs in fp32.
    `init="burda"` (the default) initialises as the authors' code did (see
    `models.networks.burda_init`), `"torch"` keeps PyTorch's default for `nn.Linear`.

    `alpha` is the VR-IWAE parameter in [0, 1) of `vr-iwae` and `vr-iwae-dreg` (None: 0.5
    for them; refused for the other objectives). `k_schedule` chooses K per epoch: `fixed`
    trains every epoch with `k`; `linear` and `ess` move between `k_min` (None: 1) and `k`,
    `ess` steering by the effective sample size against `ess_target` (None: 0.15); see
    `models.k_schedule`. Options that do not apply are refused rather than ignored.

    `missing_rate` > 0 trains on incomplete images (Mattei & Frellsen, 2019): with
    `missing_pattern` `mcar` each pixel is missing with that probability; with `top-half` or
    `random-square` that fraction of the images loses its top half or a random square of half
    the side (see `models.missing`). The bound then counts observed pixels only.

    `snr_draws` > 0 also measures, after the evaluation, the encoder's and the decoder's
    gradient SNR at the trained parameters from that many gradient draws (see
    `models.run.train_and_evaluate`); 0 skips it.

    `cuda_graphs` replays each full-batch training step as a CUDA graph (see
    `models.cuda_graphs`): the same arithmetic and random draws, fewer kernel launches. It
    needs a CUDA GPU, so `device="cpu"` refuses it. So does `precision="tf32"`: fp32 tensors
    whose matrix products on the GPU round their inputs to TF32 (10-bit mantissa), at the
    tensor cores' rate (see `models.training.tf32_matmuls`); `bf16` is autocast.
    """

    k: int = 50
    objective: Objective = "iwae"
    m: int = 1
    beta: float = 0.5
    epochs: int = 1
    batch_size: int = 100
    learning_rate: float = 1e-3
    schedule: Schedule = "constant"
    model: ModelConfig = field(default_factory=ModelConfig)
    train_size: int | None = None
    eval_size: int = 10_000
    eval_k: int = 5000
    seed: int = 0
    device: Device = "auto"
    precision: Precision = "fp32"
    alpha: float | None = None
    k_schedule: KSchedule = "fixed"
    k_min: int | None = None
    ess_target: float | None = None
    missing_rate: float = 0.0
    missing_pattern: MissingPattern = "mcar"
    init: Init = "burda"  # trained better in a short run: docs/science.md, "Reproducing Burda"
    snr_draws: int = 0
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose from {OBJECTIVES}")
        for name in ("k", "m", "epochs", "batch_size", "eval_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError("beta must lie in [0, 1]")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError("train_size must be positive (or None for all images)")
        if self.eval_size < 0:
            raise ValueError("eval_size must be >= 0")
        if self.snr_draws != 0 and self.snr_draws < MIN_SNR_DRAWS:
            raise ValueError(f"snr_draws must be 0 (no SNR) or at least {MIN_SNR_DRAWS}")
        if self.init not in get_args(Init):
            raise ValueError(f"unknown init {self.init!r}; choose from {get_args(Init)}")
        if not 0.0 <= self.missing_rate <= MAX_MISSING_RATE:
            raise ValueError(f"missing_rate must lie in [0, {MAX_MISSING_RATE}]")
        if self.missing_pattern not in MISSING_PATTERNS:
            raise ValueError(
                f"unknown missing_pattern {self.missing_pattern!r}; choose from {MISSING_PATTERNS}"
            )
        side = math.isqrt(self.model.x_dim)
        if self.missing_pattern == "random-square" and side * side != self.model.x_dim:
            raise ValueError("missing_pattern 'random-square' needs square images (x_dim = n^2)")
        if self.cuda_graphs and self.device == "cpu":
            raise ValueError("cuda_graphs needs a CUDA GPU: use device 'cuda' or 'auto'")
        if self.precision == "tf32" and self.device == "cpu":
            raise ValueError("precision 'tf32' needs a CUDA GPU: use device 'cuda' or 'auto'")
        self._resolve_alpha()
        self._resolve_k_schedule()

    def _resolve_alpha(self) -> None:
        if self.objective not in VR_OBJECTIVES:
            if self.alpha is not None:
                raise ValueError(f"alpha applies only to {VR_OBJECTIVES}, not {self.objective!r}")
            return
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_ALPHA)
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError("alpha must lie in [0, 1)")

    def _resolve_k_schedule(self) -> None:
        if self.k_schedule not in K_SCHEDULES:
            raise ValueError(f"unknown k_schedule {self.k_schedule!r}; choose from {K_SCHEDULES}")
        if self.k_schedule == "fixed" and self.k_min is not None:
            raise ValueError("k_min applies only to k_schedule 'linear' or 'ess'")
        if self.k_schedule != "ess" and self.ess_target is not None:
            raise ValueError("ess_target applies only to k_schedule 'ess'")
        if self.k_schedule == "fixed":
            return
        if self.k_min is None:
            object.__setattr__(self, "k_min", DEFAULT_K_MIN)
        if not 1 <= self.k_min <= self.k:
            raise ValueError(f"k_min must lie in [1, k={self.k}], got {self.k_min}")
        if self.k_schedule == "ess":
            if self.train_size is not None and self.train_size <= self.batch_size:
                raise ValueError(
                    "k_schedule 'ess' holds out one batch of training images: train_size "
                    "must exceed batch_size"
                )
            if self.ess_target is None:
                object.__setattr__(self, "ess_target", DEFAULT_ESS_TARGET)
            if not 0.0 < self.ess_target < 1.0:
                raise ValueError("ess_target must lie in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys are refused so typos do not pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        values = dict(data)
        values.setdefault("init", "torch")  # what every record written before `init` used
        if isinstance(values.get("model"), dict):
            values["model"] = ModelConfig(**values["model"])
        return cls(**values)

    def with_changes(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)


# Burda et al. (2015), section 5 and the authors' code: batch 20, their initialisation, 3^i
# epochs at 1e-3 * 10^(-i/7) for i = 0..7, and log p(x) of all 10,000 test images at k=5000.
PRESETS: dict[str, dict[str, Any]] = {
    "burda": {
        "batch_size": 20,
        "init": "burda",
        "schedule": "burda",
        "epochs": sum(3**i for i in range(8)),  # 3280
        "eval_size": 10_000,
        "eval_k": 5000,
    },
}


def preset_config(
    preset: Preset | None, *, given: Collection[str] | None = None, **fields: Any
) -> TrainConfig:
    """A `TrainConfig` from `preset`'s values with `fields` on top: the one merge behind
    POST /train, POST /studies and the command line.

    `fields` may name the `MODEL_FIELDS` flat, as requests and options do. With `given` (the
    names set explicitly), the other `fields` are defaults that fill in what the preset does
    not set: the preset's own values win over them.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if given is not None:
        fields = over_preset(preset, fields, given)
    model = {name: fields.pop(name) for name in MODEL_FIELDS if name in fields}
    if model:
        fields["model"] = ModelConfig(**model)
    return TrainConfig(**{**PRESETS.get(preset or "", {}), **fields})


def over_preset(
    preset: Preset | None, fields: dict[str, Any], given: Collection[str]
) -> dict[str, Any]:
    """`fields` without those that `preset` sets and that were not `given` explicitly."""
    values = PRESETS.get(preset or "", {})
    return {name: v for name, v in fields.items() if name in given or name not in values}
