"""The API process's settings: the worker's (storage, broker) plus the API's own limits.

Read from `IWAE_*` environment variables once, through `get_settings()`; every field has a
safe default, so importing this module never fails and never touches the disk.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator

from worker.jobs import WorkerSettings


class Settings(WorkerSettings):
    api_token: SecretStr | None = Field(
        None,
        description="When set, POST /train, POST /studies and the cancel routes require "
        "`Authorization: Bearer <token>`; reads stay open. Unset: no authentication, which "
        "`iwae serve` allows only on a loopback address unless IWAE_ALLOW_ANONYMOUS is set.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Let `iwae serve` listen on a non-loopback address (e.g. 0.0.0.0, as in "
        "Docker) without IWAE_API_TOKEN, so that anyone who reaches the port can queue "
        "training jobs; without it the server refuses to start.",
    )
    max_samples_per_step: int = Field(
        250_000,
        ge=1,
        description="Largest k * m * batch_size of a training job (importance samples per "
        "step, which bound a step's memory: about 9 KB each for Burda's one-layer model and "
        "15 KB for the two-layer one, so 2 to 4 GB at the limit); POST /train answers 422 "
        "above it.",
    )
    max_step_flops: int = Field(
        500_000_000_000,
        ge=1,
        description="Largest FLOPs of one training step, 6*(batch*image_macs + "
        "k*m*batch*sample_macs) (models/cost.py: the network's width counts, squared); 5e11 "
        "admits 250,000 samples a step of the authors' two-layer model (4.2e11). With "
        "IWAE_MAX_SAMPLES_PER_STEP it bounds a step's time and memory. POST /train answers "
        "422 above it.",
    )
    max_train_flops: int = Field(
        20_000_000_000_000_000,
        ge=1,
        description="Largest FLOPs of a whole training run, 6*epochs*images*(image_macs + "
        "k*m*sample_macs), which bound its time; 2e16 admits Burda et al.'s K=50 runs of 3280 "
        "epochs over 60,000 images (1.25e16 one-layer, 1.69e16 the authors' two-layer). POST "
        "/train answers 422 above it.",
    )
    max_study_jobs: int = Field(
        60,
        ge=1,
        description="Most cells (training jobs) of one study, ks x objectives x seeds; POST "
        "/studies answers 422 above it.",
    )
    max_upload_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1,
        description="Largest request body in bytes (10 MiB); larger uploads get 413, "
        "refused as the bytes arrive, before the whole body is read.",
    )
    max_image_pixels: int = Field(
        4_000_000,
        ge=784,
        description="Largest uploaded image, width x height; larger ones (decompression "
        "bombs) get 413 from the image header alone.",
    )
    max_loglik_k: int = Field(100_000, ge=1, description="Largest `k` that POST /loglik accepts.")
    default_loglik_k: int = Field(
        5000, ge=1, description="`k` of POST /loglik when the request gives none."
    )
    max_samples: int = Field(1024, ge=1, description="Largest `n` that GET /samples accepts.")
    max_impute_k: int = Field(
        10_000,
        ge=1,
        description="Largest `k` that POST /impute accepts; one request holds about 6 KB per "
        "importance sample (60 MB at the default).",
    )
    model_cache_size: int = Field(
        4, ge=1, description="Trained models kept loaded in memory (least recently used out)."
    )
    loglik_chunk_size: int = Field(
        1000,
        ge=1,
        description="Importance samples evaluated at once by POST /loglik; bounds the "
        "memory of one request (about 3 MB of decoder output per 1000) whatever its `k`.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Threads each inference may use (torch.set_num_threads); unset: torch's "
        "default, one per core. 1 gives steadier latency under many concurrent requests or "
        "on a machine shared with training.",
    )
    inference_device: Literal["cpu", "cuda"] = Field(
        "cpu", description="Where the API runs its models (training runs in the worker)."
    )
    inference_concurrency: int | None = Field(
        None,
        ge=1,
        description="Model calls (/samples, /reconstruct, /loglik, /impute) that run at "
        "once; unset: one per core. Others wait in the queue below.",
    )
    inference_queue: int = Field(
        16,
        ge=0,
        description="Model calls that may wait for a free slot; past it, 503 with Retry-After.",
    )
    inference_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Deadline of one model call, its wait in the queue included; checked "
        "between chunks of importance samples, past it 503 with Retry-After.",
    )

    allowed_hosts: str | None = Field(
        None,
        description="Comma-separated names the API answers to in the Host header (any port), "
        "`*` for any; other requests get 400 (DNS rebinding). Unset: any, except that `iwae "
        "serve` on a loopback address without IWAE_API_TOKEN allows localhost, 127.0.0.1 and "
        "[::1] only.",
    )
    max_event_streams: int = Field(
        64,
        ge=1,
        description="Server-sent event streams (GET /jobs/{job_id}/events) open at once; "
        "past it 429 with Retry-After. Their store reads share 4 threads of their own.",
    )
    event_stream_max_s: float = Field(
        3600.0,
        gt=0,
        description="Longest life of one event stream; then the server closes it (a "
        "browser's EventSource reconnects by itself).",
    )
    http_concurrency: int = Field(
        1024,
        ge=1,
        description="Connections and requests `iwae serve` handles at once (uvicorn's "
        "limit_concurrency); past it new ones get 503 at once.",
    )

    @property
    def inference_slots(self) -> int:
        """`inference_concurrency`, or the cores this process may run on when it is unset."""
        if self.inference_concurrency is not None:
            return self.inference_concurrency
        if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset and cpusets
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1

    @model_validator(mode="after")
    def _default_k_within_limit(self) -> Self:
        if self.default_loglik_k > self.max_loglik_k:
            raise ValueError("default_loglik_k must not exceed max_loglik_k")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests call `get_settings.cache_clear()`."""
    return Settings()
