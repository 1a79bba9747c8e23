"""The API process's settings: the worker's (storage, broker) plus the API's own limits.

Read from `IWAE_*` environment variables once, through `get_settings()`; every field has a
safe default, so importing this module never fails and never touches the disk.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal, Self

from pydantic import Field, SecretStr, model_validator

from worker.jobs import WorkerSettings


class Settings(WorkerSettings):
    api_token: SecretStr | None = Field(
        None,
        description="When set, POST /train and POST /jobs/{id}/cancel require "
        "`Authorization: Bearer <token>`; reads stay open. Unset: no authentication.",
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

    @model_validator(mode="after")
    def _default_k_within_limit(self) -> Self:
        if self.default_loglik_k > self.max_loglik_k:
            raise ValueError("default_loglik_k must not exceed max_loglik_k")
        return self


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once; tests call `get_settings.cache_clear()`."""
    return Settings()
