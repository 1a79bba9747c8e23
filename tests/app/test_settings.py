"""API settings (app.settings): every field has a default and a description, they come from
the environment (an empty variable means "use the default"), and `get_settings()` caches."""

from __future__ import annotations

import pytest

from app.settings import Settings, get_settings


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


def test_every_setting_has_a_default_and_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert not field.is_required(), f"{name} has no default"
        assert field.description, f"{name} has no description"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_API_TOKEN", "t0ken")
    monkeypatch.setenv("IWAE_MAX_SAMPLES", "12")
    settings = Settings()
    assert settings.api_token is not None
    assert settings.api_token.get_secret_value() == "t0ken"
    assert "t0ken" not in repr(settings)
    assert settings.max_samples == 12


def test_default_k_must_not_exceed_the_limit() -> None:
    with pytest.raises(ValueError, match="default_loglik_k"):
        Settings(max_loglik_k=10, default_loglik_k=100)


def test_get_settings_is_cached_and_resettable(monkeypatch: pytest.MonkeyPatch) -> None:
    get_settings.cache_clear()
    monkeypatch.setenv("IWAE_MAX_SAMPLES", "7")
    assert get_settings() is get_settings()
    assert get_settings().max_samples == 7
    get_settings.cache_clear()
