"""The Host-header allow-list (app.hosts): DNS rebinding cannot reach an anonymous API."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.hosts import LOOPBACK_HOSTS, host_name, parse_hosts


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("localhost:8000", "localhost"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8000", "[::1]"),
        ("Evil.Example:80", "evil.example"),
        ("::1", "::1"),  # not a valid Host: left whole, so refused
    ],
)
def test_the_port_is_not_part_of_the_name(header: str, name: str) -> None:
    assert host_name(header) == name


def test_a_star_allows_any_host() -> None:
    assert parse_hosts("*") is None
    assert parse_hosts(" Localhost , 127.0.0.1,") == {"localhost", "127.0.0.1"}


@pytest.mark.parametrize("base", ["http://localhost:8000", "http://127.0.0.1", "http://[::1]:80"])
def test_loopback_names_are_served(make_client: Callable[..., TestClient], base: str) -> None:
    client = make_client(allowed_hosts=LOOPBACK_HOSTS)
    client.base_url = base
    assert client.get("/healthz").status_code == 200


def test_another_sites_name_is_refused_with_json(make_client: Callable[..., TestClient]) -> None:
    client = make_client(allowed_hosts=LOOPBACK_HOSTS)
    client.base_url = "http://rebound.attacker.example:8000"
    response = client.post("/train", json={"k": 1})
    assert response.status_code == 400
    assert response.json()["detail"].startswith(
        "host 'rebound.attacker.example:8000' is not served here"
    )


def test_without_the_setting_any_host_is_served(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    client.base_url = "http://api.example.org"
    assert client.get("/healthz").status_code == 200
