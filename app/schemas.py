"""Every request and response body of the REST API, with its limits and /docs examples."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from models.config import (
    DEFAULT_ALPHA,
    DEFAULT_ESS_TARGET,
    DEFAULT_K_MIN,
    MAX_K,
    MAX_MISSING_RATE,
    MAX_SEED,
    MIN_SNR_DRAWS,
    Init,
    KSchedule,
    MissingPattern,
    ModelConfig,
    Objective,
    Precision,
    Preset,
    Schedule,
    TrainConfig,
    preset_config,
)
from models.progress import RunPhase
from models.status import StudyStatus
from models.study.grid import CELL_FIELDS, MAX_KS, MAX_SEEDS, STUDY_SNR_DRAWS
from worker.jobs import JobStatus, StudyView

# Job and model ids name directories under IWAE_HOME: no separators, no leading dot.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
CURSOR_PATTERN = r"^[0-9]{1,20}(\.[0-9]{1,20})?$"
MODEL_CURSOR_PATTERN = r"^[0-9A-Za-z:.+_-]{1,200}$"
ImageFormat = Literal["png", "json"]

_TRAIN = TrainConfig()  # defaults come from the one config that travels with checkpoints
_MODEL = ModelConfig()


class TrainRequest(BaseModel):
    """A training job: objective, optimisation, architecture and final evaluation."""

    model_config = ConfigDict(extra="forbid")

    preset: Preset | None = Field(
        None,
        description="`burda`: Burda et al.'s training, i.e. batch_size 20, init `burda`, "
        "schedule `burda` with 3280 epochs, eval_size 10000 at eval_k 5000. Fields given "
        "explicitly override the preset's.",
        examples=[None],
    )
    k: int = Field(ge=1, le=MAX_K, description="Importance samples per data point.", examples=[5])
    objective: Objective = Field(
        _TRAIN.objective,
        description="Training objective: `vae` is the ELBO; `iwae` the K-sample bound; "
        "`iwae-dreg` its doubly reparameterized encoder gradient (unbiased, lower variance; "
        "Tucker et al. 2019); `iwae-stl` drops the score term of the encoder gradient "
        "(Roeder et al. 2017): lower variance, but for K > 1 biased (Tucker et al. 2019); "
        "`miwae`, `ciwae` and `piwae` the combinations of Rainforth et al. (2018); "
        "`vr-iwae` the VR-IWAE bound of Daudel et al. (2023) with parameter `alpha`, and "
        "`vr-iwae-dreg` its doubly reparameterised encoder gradient.",
        examples=["iwae"],
    )
    m: int = Field(
        _TRAIN.m,
        ge=1,
        le=64,
        description="Groups of K samples for `miwae` and `piwae` (ignored otherwise).",
        examples=[1],
    )
    beta: float = Field(
        _TRAIN.beta,
        ge=0.0,
        le=1.0,
        description="Weight of the ELBO in `ciwae` (ignored otherwise).",
        examples=[0.5],
    )
    alpha: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description=f"VR-IWAE parameter of `vr-iwae` and `vr-iwae-dreg`: 0 is IWAE, toward 1 "
        f"the ELBO; null: {DEFAULT_ALPHA}. Refused for the other objectives.",
        examples=[DEFAULT_ALPHA],
    )
    k_schedule: KSchedule = Field(
        _TRAIN.k_schedule,
        description="K per epoch: `fixed` (k throughout), `linear` (k_min to k over the "
        "epochs), `ess` (from k_min, doubled or halved after each epoch as the held-out "
        "ESS/K of k samples is below or above `ess_target`; holds out one batch).",
        examples=["fixed"],
    )
    k_min: int | None = Field(
        None,
        ge=1,
        le=MAX_K,
        description=f"Smallest K of the `linear` and `ess` schedules (at most k); null: "
        f"{DEFAULT_K_MIN}. Refused for `fixed`.",
        examples=[DEFAULT_K_MIN],
    )
    ess_target: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description=f"ESS/K target of the `ess` schedule; null: {DEFAULT_ESS_TARGET}. Refused "
        "for the other schedules.",
        examples=[DEFAULT_ESS_TARGET],
    )
    epochs: int = Field(
        _TRAIN.epochs, ge=1, le=10_000, description="Passes over the training set.", examples=[5]
    )
    batch_size: int = Field(
        _TRAIN.batch_size, ge=1, le=10_000, description="Images per step.", examples=[100]
    )
    learning_rate: float = Field(
        _TRAIN.learning_rate,
        gt=0.0,
        le=1.0,
        description="Adam's learning rate (the starting one under the `burda` schedule).",
        examples=[0.001],
    )
    schedule: Schedule = Field(
        _TRAIN.schedule,
        description="`constant`, or `burda`: the paper's 3^i epochs at 1e-3 * 10^(-i/7).",
        examples=["constant"],
    )
    init: Init = Field(
        _TRAIN.init,
        description="`burda`: Glorot-uniform weights, zero biases and the output bias at the "
        "logit of the mean training pixel, as the authors' code; `torch`: PyTorch's default.",
        examples=[_TRAIN.init],
    )
    layers: Literal[1, 2] = Field(
        _MODEL.layers,
        description="Stochastic layers (Burda et al.'s two MNIST models).",
        examples=[1],
    )
    latent_dim: int = Field(
        _MODEL.latent_dim,
        ge=1,
        le=1024,
        description="Width of the top latent layer.",
        examples=[50],
    )
    hidden_dim: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Width of the deterministic hidden layers; null: 200 for one stochastic "
        "layer, 100 for two.",
        examples=[200],
    )
    z1_dim: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Two layers only: width of z1; null: hidden_dim (the paper's 100).",
        examples=[100],
    )
    hidden2_dim: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Two layers only: hidden width between z1 and z2; null: latent_dim (the "
        "paper's 50). The authors' code: hidden_dim 200, z1_dim 100, hidden2_dim 100.",
        examples=[50],
    )
    train_size: int | None = Field(
        _TRAIN.train_size,
        ge=1,
        le=60_000,
        description="Train on the first N of the 60,000 training images; null: all of them.",
        examples=[10_000],
    )
    eval_size: int = Field(
        _TRAIN.eval_size,
        ge=0,
        le=10_000,
        description="Test images for the final log-likelihood; 0 skips the evaluation.",
        examples=[1000],
    )
    eval_k: int = Field(
        _TRAIN.eval_k,
        ge=1,
        le=MAX_K,
        description="Importance samples for the final log-likelihood.",
        examples=[5000],
    )
    snr_draws: int = Field(
        _TRAIN.snr_draws,
        ge=0,
        le=10_000,
        description="After the evaluation, measure the encoder's and the decoder's gradient "
        f"SNR at the trained parameters from this many gradient draws; 0 skips it, else at "
        f"least {MIN_SNR_DRAWS}.",
        examples=[100],
    )
    seed: int = Field(
        _TRAIN.seed, ge=0, le=MAX_SEED, description="Seed of every random draw.", examples=[0]
    )
    precision: Precision = Field(
        _TRAIN.precision,
        description="Training arithmetic: fp32; tf32, fp32 whose matrix products on the GPU "
        "round their inputs to TF32 (needs a worker with a CUDA GPU; on a CPU worker the job "
        "fails with that error); bf16 autocast. Evaluation always runs in fp32.",
        examples=["fp32"],
    )
    cuda_graphs: bool = Field(
        _TRAIN.cuda_graphs,
        description="Replay each full-batch training step as a CUDA graph: the same "
        "arithmetic with fewer kernel launches. Needs a worker with a CUDA GPU; on a CPU "
        "worker the job fails with that error.",
        examples=[False],
    )
    missing_rate: float = Field(
        _TRAIN.missing_rate,
        ge=0.0,
        le=MAX_MISSING_RATE,
        description="Train on incomplete images (Mattei & Frellsen's missing-data IWAE): the "
        "fraction of pixels (`mcar`) or of images (`top-half`, `random-square`) with missing "
        "pixels; the bound counts observed pixels only. 0: complete images.",
        examples=[0.5],
    )
    missing_pattern: MissingPattern = Field(
        _TRAIN.missing_pattern,
        description="`mcar`: each pixel missing at random; `top-half`: the top 14 rows; "
        "`random-square`: a 14x14 square at a random place. Fresh masks every epoch.",
        examples=["mcar"],
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainRequest:
        """Options that depend on each other (alpha and the objective, k_min and k, ...) are
        checked by building the config, so a bad combination is a 422, not a failed job."""
        self.to_config()
        return self

    def to_config(self) -> dict[str, Any]:
        """The job's `TrainConfig` as a dict: the preset's values under the fields given."""
        values = self.model_dump()
        preset = values.pop("preset")
        return preset_config(preset, given=self.model_fields_set, **values).to_dict()


class ProgressOut(BaseModel):
    """Where a running job stands; updated after every training step."""

    phase: RunPhase | None = Field(
        None,
        description="`train`, then `eval` (test log-likelihood), then `impute` (the "
        "imputation metric), then `snr` (gradient SNR, when `snr_draws` > 0).",
        examples=["train"],
    )
    epoch: int | None = Field(
        None,
        description="Training: the epoch in progress, from 1; evaluation: epochs trained.",
        examples=[2],
    )
    epochs: int | None = Field(None, description="Epochs in the run.", examples=[5])
    step: int | None = Field(
        None,
        description="Training: steps done in this epoch; evaluation: test images done.",
        examples=[395],
    )
    steps: int | None = Field(
        None,
        description="Training: steps per epoch; evaluation: test images to score.",
        examples=[600],
    )
    loss: float | None = Field(None, description="Last training loss, nats.", examples=[95.3])
    images_per_s: float | None = Field(None, examples=[25_000.0])
    eta_s: float | None = Field(None, description="Estimated seconds to the end.", examples=[42.0])
    k: int | None = Field(
        None,
        description="Importance samples per image in the current training epoch (it changes "
        "between epochs under k_schedule `linear` or `ess`).",
        examples=[50],
    )


class JobOut(BaseModel):
    """A training job as the job store records it."""

    model_config = ConfigDict(from_attributes=True)

    job_id: str = Field(examples=["3f2c9a1e0b7d4c55a1e2f3b4c5d6e7f8"])
    status: JobStatus = Field(examples=["running"])
    config: dict[str, Any] = Field(description="The job's full TrainConfig.")
    progress: ProgressOut | None = None
    metrics: dict[str, Any] | None = Field(
        None,
        description="Final metrics: test_loglik (nats, IWAE bound at eval_k), "
        "test_loglik_std_error (over images), test_elbo, test_gap (test_loglik - test_elbo), "
        "mc_std_error_mean (per-image Monte Carlo error), ess_mean, pareto_k_mean, "
        "pareto_k_above_0_7 (share of images whose error estimate is unreliable), "
        "active_units, train_seconds, k_per_epoch (the K of every epoch), ess_per_epoch "
        "(k_schedule `ess`: the held-out ESS/K after every epoch), ...",
        examples=[
            {
                "test_loglik": -86.7,
                "test_loglik_std_error": 0.05,
                "test_elbo": -91.2,
                "test_gap": 4.5,
                "mc_std_error_mean": 0.3,
                "ess_mean": 240.0,
                "pareto_k_mean": 0.62,
                "pareto_k_above_0_7": 0.31,
                "active_units": [19],
            }
        ],
    )
    model_id: str | None = Field(None, description="Set once a checkpoint exists.")
    error: str | None = Field(None, description="Why the job failed.")
    waiting_for: str | None = Field(
        None,
        description="Why a queued job does not start: no live worker consumes its queue (a "
        "job that asks for device 'cuda' waits for a GPU worker). Set by GET /jobs/{job_id}.",
    )
    attempts: int = Field(0, description="How many times a worker started this job.")
    worker: str | None = Field(None, description="host:pid of the last worker to run it.")
    cancel_requested: bool = False
    study_id: str | None = Field(None, description="The study this job is a cell of.")
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def of(cls, record: Any) -> JobOut:
        """From the job store's `JobRecord`."""
        return cls.model_validate(record, from_attributes=True)


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class ModelOut(BaseModel):
    """A trained model: what it was trained with and how well it scores."""

    model_id: str = Field(examples=["3f2c9a1e0b7d4c55a1e2f3b4c5d6e7f8"])
    job_id: str | None = None
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None
    created_at: datetime | None = None


class ModelList(BaseModel):
    models: list[ModelOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )


class SamplesOut(BaseModel):
    model_id: str
    samples: list[list[float]] = Field(
        description="n images of 784 Bernoulli means in [0, 1], row-major 28x28."
    )


class ReconstructionOut(BaseModel):
    model_id: str
    input: list[float] = Field(
        description="The uploaded digit as the model saw it: 784 binarized pixels."
    )
    reconstruction: list[float] = Field(description="784 Bernoulli means in [0, 1].")


class LoglikOut(BaseModel):
    """The K-sample importance-weighted estimate of log p(x) for the binarized upload."""

    model_id: str
    k: int = Field(description="Importance samples used.", examples=[5000])
    log_likelihood: float = Field(
        description="IWAE bound log (1/K) sum_k w_k, nats; a lower bound on log p(x) in "
        "expectation.",
        examples=[-85.2],
    )
    std_error: float = Field(
        description="Delta-method Monte Carlo standard error, nats; it assumes the weights "
        "have a finite variance, so do not trust it when `pareto_k` > 0.7.",
        examples=[0.4],
    )
    elbo: float = Field(description="Mean log-weight (the ELBO), nats.", examples=[-91.0])
    bits_per_dim: float = Field(description="-log_likelihood / (784 ln 2).", examples=[0.157])
    ess: float = Field(
        description="Effective sample size of the K weights, (sum w)^2 / sum w^2, in [1, K].",
        examples=[212.4],
    )
    pareto_k: float | None = Field(
        description="Pareto k-hat of the largest weights (PSIS, Vehtari et al. 2024): below "
        "0.5 the estimate is reliable, above 0.7 its variance is not finite in practice and "
        "`std_error` understates the real error. null when k <= 20 (too few weights to fit).",
        examples=[0.43],
    )


class ImputationOut(BaseModel):
    """The uploaded digit's missing pixels filled in (Mattei & Frellsen, 2019)."""

    model_id: str
    k: int = Field(description="Importance samples used.", examples=[1000])
    input: list[float] = Field(
        description="The digit as the model saw it: 784 binarized pixels, 0 where missing."
    )
    missing: list[int] = Field(description="784 flags, 1 where the pixel is missing.")
    single: list[float] = Field(
        description="Single imputation: the input's observed pixels, and at missing pixels "
        "E[x_missing | x_observed] estimated by self-normalised importance sampling (in [0, 1])."
    )
    draws: list[list[float]] = Field(
        description="n multiple imputations by sampling importance resampling: binary images "
        "that differ from the input only at missing pixels."
    )
    observed_log_likelihood: float = Field(
        description="IWAE bound on log p(x_observed) with k samples, nats.", examples=[-45.3]
    )


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    status: Literal["ready"] = "ready"
    checks: dict[str, bool] = Field(examples=[{"storage": True, "job_store": True, "broker": True}])
    workers: int = Field(
        description="Live workers consuming the training queue; 0 means queued jobs wait "
        "(the API still serves trained models, so it stays ready).",
        examples=[2],
    )
    gpu_workers: int = Field(
        description="Those of them with a GPU; 0 means jobs that ask for device 'cuda' wait.",
        examples=[1],
    )


class ErrorOut(BaseModel):
    detail: str = Field(examples=["no model with id 'abc'"])


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes, each with an `ErrorOut` body."""
    return {code: {"model": ErrorOut} for code in codes}


# --- studies ------------------------------------------------------------------------------

CellStatus = Literal[JobStatus, "missing"]


class _StudyGrid(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"ks": [1, 5, 50], "objectives": ["vae", "iwae"], "seeds": [0, 1, 2], "epochs": 10}
            ]
        },
    )

    ks: list[int] = Field(
        description=f"K of each cell: 1 to {MAX_KS} distinct values, each in 1..{MAX_K}.",
        examples=[[1, 5, 50]],
    )
    objectives: list[Objective] = Field(
        ["vae", "iwae"],
        description="Training objectives (see POST /train), distinct.",
        examples=[["vae", "iwae"]],
    )
    seeds: list[int] = Field(
        [0], description=f"Seeds, distinct, at most {MAX_SEEDS}.", examples=[[0, 1, 2]]
    )
    snr_draws: int = Field(
        STUDY_SNR_DRAWS,
        ge=0,
        le=10_000,
        description="As in POST /train, but on by default: gradients drawn for each cell's "
        f"encoder and decoder SNR at its trained parameters; 0 skips it, else at least "
        f"{MIN_SNR_DRAWS}.",
        examples=[STUDY_SNR_DRAWS],
    )


StudyRequest = create_model(
    "StudyRequest",
    __base__=_StudyGrid,
    __doc__="A K study: one training job per (objective, k, seed) of the grid, every other "
    "field as in POST /train and the same for every cell.",
    **{
        name: (field.annotation, field)
        for name, field in TrainRequest.model_fields.items()
        # The grid's axes (`CELL_FIELDS`) are lists above; every other field is TrainRequest's.
        if name not in CELL_FIELDS and name not in _StudyGrid.model_fields
    },
)


def _mean_sd(mean: float | None, n: int = 1) -> dict[str, Any]:
    return {"mean": mean, "sd": None, "n": n}


# From a real study (2 epochs of 2000 images; `config` and the cells' metrics shortened).
RESULTS_EXAMPLE = {
    "config": {"epochs": 2, "train_size": 2000, "eval_size": 200, "eval_k": 500, "snr_draws": 100},
    "status": "succeeded",
    "cells": [
        {
            "name": "iwae-k5-s0",
            "objective": "iwae",
            "k": 5,
            "seed": 0,
            "status": "succeeded",
            "job_id": "9ba65d100800466dbcff388b31840cff",
            "error": None,
            "config": {"k": 5, "objective": "iwae", "seed": 0, "epochs": 2},
            "metrics": {"test_loglik": -169.68, "active_units": [50]},
        }
    ],
    "summary": [
        {
            "objective": "iwae",
            "k": 5,
            "n": 1,
            "seeds": [0],
            "test_loglik": _mean_sd(-169.68),
            "test_elbo": _mean_sd(-183.67),
            "test_gap": _mean_sd(13.99),
            "active_units": _mean_sd(50.0),
            "seconds_per_epoch": _mean_sd(6.85),
            "images_per_s": _mean_sd(292.0),
            "snr_encoder": _mean_sd(0.248),
            "snr_decoder": _mean_sd(1.086),
            "active_units_per_layer": [_mean_sd(50.0)],
        }
    ],
    "snr_slopes": {"iwae": {"encoder": -0.173, "decoder": 0.112}},
}


class StudyCellOut(BaseModel):
    """One cell of a study and where its job stands."""

    objective: str = Field(examples=["iwae"])
    k: int = Field(examples=[50])
    seed: int = Field(examples=[0])
    job_id: str = Field(
        description="Its training job (GET /jobs/{job_id}).",
        examples=["3f2c9a1e0b7d4c55a1e2f3b4c5d6e7f8"],
    )
    status: CellStatus = Field(
        description="The job's status; `missing` when its record was never created (the "
        "server stopped while creating the study).",
        examples=["running"],
    )
    progress: ProgressOut | None = None
    error: str | None = Field(None, description="Why the cell failed.")
    model_id: str | None = Field(None, description="The trained model, once it succeeded.")


class _StudyHead(BaseModel):
    study_id: str = Field(examples=["9b1d4c2e7f3a4b5c8d9e0f1a2b3c4d5e"])
    status: StudyStatus = Field(
        description="From the cells' statuses: `queued` (none started), `running`, "
        "`succeeded` (all), `partial` (some succeeded, some failed or were cancelled), "
        "`failed`, `cancelled`.",
        examples=["running"],
    )
    created_at: datetime
    ks: list[int] = Field(examples=[[1, 5, 50]])
    objectives: list[str] = Field(examples=[["vae", "iwae"]])
    seeds: list[int] = Field(examples=[[0]])

    @staticmethod
    def _head(view: StudyView) -> dict[str, Any]:
        cells = view.study.cells
        return {
            "study_id": view.study.study_id,
            "status": view.status,
            "created_at": view.study.created_at,
            "ks": list(dict.fromkeys(c.k for c in cells)),
            "objectives": list(dict.fromkeys(c.objective for c in cells)),
            "seeds": list(dict.fromkeys(c.seed for c in cells)),
        }


class StudySummaryOut(_StudyHead):
    """A study as GET /studies lists it."""

    cells: dict[str, int] = Field(
        description="Its cells by status.", examples=[{"succeeded": 3, "running": 2, "queued": 1}]
    )

    @classmethod
    def of(cls, view: StudyView) -> StudySummaryOut:
        counts = {s: view.statuses.count(s) for s in dict.fromkeys(view.statuses)}
        return cls(**cls._head(view), cells=counts)


class StudyOut(_StudyHead):
    """A K study: its grid, each cell's job, and the results of the cells that ended."""

    config: dict[str, Any] = Field(
        description="The TrainConfig every cell shares, but for objective, k and seed."
    )
    cells: list[StudyCellOut] = Field(description="Objective-major, then k, then seed.")
    results: dict[str, Any] = Field(
        description="As GET /studies/{study_id}/results.json: every cell with its config and "
        "numbers, and `summary`: per (objective, k), the mean and sd over succeeded seeds of "
        "test_loglik, test_elbo, active units, seconds per epoch, images/s, and the encoder "
        "and decoder gradient SNR; `snr_slopes`: the fitted log-log slopes of SNR against K.",
        examples=[RESULTS_EXAMPLE],
    )

    @classmethod
    def of(cls, view: StudyView, results: dict[str, Any]) -> StudyOut:
        """From the study's view and its results."""
        cells = []
        for cell, record, status in zip(view.study.cells, view.records, view.statuses, strict=True):
            job = (
                {}
                if record is None
                else record.model_dump(include={"progress", "error", "model_id"})
            )
            cells.append(StudyCellOut(**cell.model_dump(), status=status, **job))
        return cls(**cls._head(view), config=view.study.config, cells=cells, results=results)


class StudyList(BaseModel):
    studies: list[StudySummaryOut] = Field(description="Newest first.")
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` for the next page; null on the last page."
    )
