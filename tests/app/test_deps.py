"""The routes' dependencies (app.deps): the app's objects from `app.state`, the job sender
that never raises, Bearer authentication, and the served model."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import anyio
import pytest
from fastapi.security import HTTPAuthorizationCredentials

from app import deps
from app.errors import NotAuthenticated


def bearer(token: str) -> HTTPAuthorizationCredentials:
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def test_the_accessors_read_the_app_s_state() -> None:
    state = SimpleNamespace(settings="S", store="J", registry="R", reports="P", metrics="M")
    request: Any = SimpleNamespace(app=SimpleNamespace(state=state))
    accessors = [
        deps.current_settings,
        deps.job_store,
        deps.model_registry,
        deps.study_reports,
        deps.app_metrics,
    ]
    assert [anyio.run(accessor, request) for accessor in accessors] == ["S", "J", "R", "P", "M"]


def test_without_a_token_setting_every_request_passes(make_settings: Callable[..., Any]) -> None:
    settings = make_settings()
    deps.require_token(settings, None)
    deps.require_token(settings, bearer("anything"))


@pytest.mark.parametrize("credentials", [None, bearer(""), bearer("t0ke"), bearer("t0ken!")])
def test_with_a_token_setting_only_that_token_passes(
    make_settings: Callable[..., Any], credentials: HTTPAuthorizationCredentials | None
) -> None:
    settings = make_settings(api_token="t0ken")
    deps.require_token(settings, bearer("t0ken"))
    with pytest.raises(NotAuthenticated, match="Authorization: Bearer <IWAE_API_TOKEN>"):
        deps.require_token(settings, credentials)


def test_the_job_sender_hands_each_id_to_the_queue() -> None:
    sent: list[str] = []
    send = deps.job_sender(sent.append)
    send("a")
    send("b")
    assert sent == ["a", "b"]


def test_the_job_sender_logs_a_failure_instead_of_raising(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(job_id: str) -> None:
        raise ConnectionError("broker down")

    deps.job_sender(broken)("job-1")
    assert "could not enqueue job job-1; it stays queued for the reaper" in caplog.text
    deps.group_sender(broken)(["job-2", "job-3"])
    assert "could not enqueue job ['job-2', 'job-3']; it stays queued" in caplog.text


def test_the_group_sender_hands_each_group_to_the_queue() -> None:
    sent: list[list[str]] = []
    deps.group_sender(sent.append)(["a", "b"])
    assert sent == [["a", "b"]]


def test_the_served_model_is_the_registry_s_load_of_the_id() -> None:
    asked: list[str | None] = []
    registry: Any = SimpleNamespace(load=lambda model_id: asked.append(model_id) or "model")
    assert deps.served_model(registry, "abc") == "model"
    assert deps.served_model(registry) == "model"
    assert asked == ["abc", None]
