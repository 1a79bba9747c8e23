"""API settings from the environment: an empty variable means "use the default"."""

from __future__ import annotations

import pytest

from app.settings import Settings


@pytest.mark.parametrize("name", ["IWAE_API_TOKEN", "IWAE_TORCH_THREADS", "IWAE_BROKER_URL"])
def test_an_empty_variable_is_the_default(monkeypatch, name):
    monkeypatch.setenv(name, "")
    field = name.removeprefix("IWAE_").lower()
    assert getattr(Settings(), field) is None


def test_a_set_variable_is_read(monkeypatch):
    monkeypatch.setenv("IWAE_TORCH_THREADS", "1")
    monkeypatch.setenv("IWAE_API_TOKEN", "s3cret")
    settings = Settings()
    assert settings.torch_threads == 1
    assert settings.api_token.get_secret_value() == "s3cret"
