"""Query parameters shared by routes: page cursors, the seed, and those whose limits are
settings (how many digits to draw, the importance samples of a log-likelihood or an
imputation). Over its setting, a value gets the same 422 that `Query(le=...)` gives for a
fixed limit.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from fastapi.exceptions import RequestValidationError

from app.deps import SettingsDep
from app.schemas import CURSOR_PATTERN, MAX_SEED, MODEL_CURSOR_PATTERN

_NEXT = "`next_cursor` of the previous page."
# The page cursors of the job store (jobs, studies) and of the model registry.
Cursor = Annotated[str | None, Query(pattern=CURSOR_PATTERN, description=_NEXT)]
ModelCursor = Annotated[str | None, Query(pattern=MODEL_CURSOR_PATTERN, description=_NEXT)]

PageSize = Annotated[int, Query(ge=1, le=1000, description="At most this many.")]

Seed = Annotated[
    int | None,
    Query(ge=0, le=MAX_SEED, description="Fix the random draws: same seed, same answer."),
]


def _above_limit(name: str, value: int, limit: int) -> RequestValidationError:
    """The 422 that `Query(le=limit)` would give, for limits that are settings."""
    return RequestValidationError(
        [
            {
                "type": "less_than_equal",
                "loc": ("query", name),
                "msg": f"Input should be less than or equal to {limit}",
                "input": value,
                "ctx": {"le": limit},
            }
        ]
    )


def sample_count(
    settings: SettingsDep,
    n: Annotated[
        int, Query(ge=1, description="How many digits; at most IWAE_MAX_SAMPLES (1024).")
    ] = 16,
) -> int:
    if n > settings.max_samples:
        raise _above_limit("n", n, settings.max_samples)
    return n


def loglik_k(
    settings: SettingsDep,
    k: Annotated[
        int | None,
        Query(
            ge=1,
            description="Importance samples; default IWAE_DEFAULT_LOGLIK_K (5000), at most "
            "IWAE_MAX_LOGLIK_K (100000). More samples, tighter bound, longer wait.",
            examples=[5000],
        ),
    ] = None,
) -> int:
    k = settings.default_loglik_k if k is None else k
    if k > settings.max_loglik_k:
        raise _above_limit("k", k, settings.max_loglik_k)
    return k


IMPUTE_K = 1000  # about 15 ms of one CPU core for a Burda-size model


def impute_k(
    settings: SettingsDep,
    k: Annotated[
        int | None,
        Query(
            ge=1,
            description=f"Importance samples; default {IMPUTE_K} (or IWAE_MAX_IMPUTE_K if "
            "lower), at most IWAE_MAX_IMPUTE_K (10000).",
            examples=[IMPUTE_K],
        ),
    ] = None,
) -> int:
    k = min(IMPUTE_K, settings.max_impute_k) if k is None else k
    if k > settings.max_impute_k:
        raise _above_limit("k", k, settings.max_impute_k)
    return k
