"""Query parameters whose limits are settings (app.params): the value, its default, and the
same 422 as `Query(le=...)` above the setting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError

from app.params import IMPUTE_K, impute_k, loglik_k, sample_count


def above(name: str, value: int, limit: int) -> list[dict[str, Any]]:
    """The error FastAPI gives for `Query(le=limit)`."""
    return [
        {
            "type": "less_than_equal",
            "loc": ("query", name),
            "msg": f"Input should be less than or equal to {limit}",
            "input": value,
            "ctx": {"le": limit},
        }
    ]


def refused(call: Callable[[], object]) -> list[dict[str, Any]]:
    with pytest.raises(RequestValidationError) as info:
        call()
    return list(info.value.errors())


def test_sample_count_up_to_its_setting(make_settings: Callable[..., Any]) -> None:
    settings = make_settings(max_samples=10)
    assert sample_count(settings, 10) == 10
    assert refused(lambda: sample_count(settings, 11)) == above("n", 11, 10)


def test_loglik_k_defaults_to_its_setting_and_stops_at_the_limit(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(default_loglik_k=7, max_loglik_k=9)
    assert loglik_k(settings, None) == 7
    assert loglik_k(settings, 9) == 9
    assert refused(lambda: loglik_k(settings, 10)) == above("k", 10, 9)


def test_impute_k_defaults_to_the_lower_of_its_default_and_limit(
    make_settings: Callable[..., Any],
) -> None:
    assert impute_k(make_settings(), None) == IMPUTE_K
    low = make_settings(max_impute_k=IMPUTE_K - 1)
    assert impute_k(low, None) == IMPUTE_K - 1
    assert refused(lambda: impute_k(low, IMPUTE_K)) == above("k", IMPUTE_K, IMPUTE_K - 1)


def test_the_route_answers_422_with_that_error(
    make_client: Callable[..., Any], tiny_model: str
) -> None:
    response = make_client(max_samples=3).get("/samples", params={"n": 4})
    assert response.status_code == 422
    assert response.json()["detail"] == [{**above("n", 4, 3)[0], "loc": ["query", "n"]}]
