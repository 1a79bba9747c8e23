"""The deployment files agree with the code, so that neither can drift from the other.

Read with PyYAML (compose files as written) and with Compose itself (the resolved project,
`compose_config`), and checked against the real thing: commands parsed by `iwae`'s own
argparse parser, environment names against the settings classes, healthcheck paths against
routes that answer 200 on `create_app()`, the image's torch against the version CI tests with.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.deploy_files import (
    COMPOSE_FILE,
    CPU_COMPOSE_FILE,
    GPUS_COMPOSE_FILE,
    IWAE_NAME,
    LOCAL_URL,
    ROOT,
    copy_deploy_files,
    dockerfile_instructions,
    env_example_entries,
    go_duration_s,
    key_values,
    load_yaml,
    run_compose,
)

ComposeConfig = Callable[..., dict[str, Any]]
IWAE_SERVICES = ("api", "worker")


# --- What the code says ---------------------------------------------------------------------


@cache
def setting_env_names() -> frozenset[str]:
    """IWAE_<FIELD> for every field of the API's settings (which extend the worker's)."""
    from app.settings import Settings
    from worker.settings import WorkerSettings

    assert set(WorkerSettings.model_fields) <= set(Settings.model_fields)
    prefix = Settings.model_config["env_prefix"]
    assert prefix == "IWAE_"
    return frozenset(prefix + name.upper() for name in Settings.model_fields)


@pytest.fixture
def get_status(settings: Any) -> Iterator[Callable[[str], int]]:
    """`get_status(path)`: the status code of GET path on the real app (lifespan run), with
    the test settings of tests/conftest.py (embedded mode under tmp_path).
    """
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        yield lambda path: client.get(path).status_code


def parse_iwae(command: list[str]) -> Any:
    """`command` parsed by the `iwae` console script's own parser (exits on a bad command)."""
    from app.cli import build_parser

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert command[0] in scripts, f"{command[0]!r} is not a console script of the project"
    assert scripts[command[0]] == "app.cli:main"
    return build_parser().parse_args(command[1:])


def serve_default_port() -> int:
    from app.cli import build_parser

    return build_parser().parse_args(["serve"]).port


# --- What the files say ---------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def dockerfile_args() -> dict[str, str]:
    """Default of every ARG (the last one declared wins)."""
    values: dict[str, str] = {}
    for keyword, arguments in dockerfile():
        if keyword == "ARG" and "=" in arguments:
            values.update(key_values(arguments))
    return values


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            env.update(key_values(arguments))
    return env


def only(keyword: str) -> str:
    found = [arguments for kw, arguments in final_stage() if kw == keyword]
    assert len(found) == 1, f"the image needs exactly one {keyword}, found {found}"
    return found[0]


def image_cmd() -> list[str]:
    return json.loads(only("CMD"))  # the exec (JSON) form, so signals reach the process


def image_healthcheck() -> list[str]:
    _options, _, command = only("HEALTHCHECK").partition("CMD ")
    assert command, "HEALTHCHECK needs a CMD"
    return json.loads(command)


def exposed_ports() -> set[int]:
    return {int(port.split("/")[0]) for port in only("EXPOSE").split()}


def ci_torch_version() -> str:
    text = (ROOT / "dev").read_text()  # what .ci/run and the README's commands install
    match = re.search(r"^\s*python -m pip install [-\w ]*torch==([\w.+]+)$", text, re.MULTILINE)
    assert match, "./dev installs a pinned torch first"
    return match.group(1)


def healthcheck_urls(test: list[str] | str) -> list[tuple[int, str]]:
    text = test if isinstance(test, str) else " ".join(test)
    return [(int(port), path) for port, path in LOCAL_URL.findall(text)]


# --- Dockerfile -------------------------------------------------------------------------


def test_image_is_multi_stage_and_copies_only_the_virtualenv() -> None:
    stages = [arguments for keyword, arguments in dockerfile() if keyword == "FROM"]
    assert len(stages) >= 2
    assert stages[0].endswith(" AS builder")
    copies = [arguments for keyword, arguments in final_stage() if keyword == "COPY"]
    assert copies == ["--from=builder /opt/venv /opt/venv"]
    assert image_env()["PATH"].startswith("/opt/venv/bin:")


def test_base_image_is_pinned_to_an_exact_python_release() -> None:
    base = dockerfile_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    for keyword, arguments in dockerfile():
        if keyword == "FROM":
            assert arguments.split()[0] == "${PYTHON_IMAGE}"


def test_image_runs_as_a_non_root_user() -> None:
    user = only("USER").split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "a numeric uid, so that runAsNonRoot-style checks can verify it"


def test_torch_build_is_chosen_by_build_args_and_is_the_tested_release() -> None:
    from packaging.requirements import Requirement

    args = dockerfile_args()
    assert re.fullmatch(r"cu\d{3}|cpu", args["TORCH_VARIANT"])
    assert args["TORCH_VARIANT"].startswith("cu"), "the default image is the GPU worker's"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    assert args["TORCH_FIND_LINKS"] in {"", '""'}, "PyTorch's index unless a build says so"
    install = next(a for k, a in dockerfile() if k == "RUN" and "torch==" in a)
    assert '--index-url "${TORCH_INDEX_URL}"' in install
    assert "--find-links /tmp/torch-wheels" in install
    assert '"torch==${TORCH_VERSION}"' in install

    version = args["TORCH_VERSION"]
    assert version == ci_torch_version(), "the image runs the torch release that CI tests"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch = next(Requirement(d) for d in dependencies if Requirement(d).name == "torch")
    assert torch.specifier.contains(version), f"torch {version} is outside {torch.specifier}"


def test_image_has_no_data_and_a_state_location() -> None:
    env = image_env()
    assert env["IWAE_HOME"] == "/data/iwae"
    assert env["IWAE_DATA_DIR"].startswith("/data/")
    assert set(IWAE_NAME.findall((ROOT / "Dockerfile").read_text())) <= setting_env_names()


def test_build_context_is_exactly_what_the_dockerfile_copies() -> None:
    """.dockerignore is an allowlist: data, checkpoints, .env and .git never reach the build."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for keyword, arguments in dockerfile():
        if keyword == "COPY" and not arguments.startswith("--from"):
            *sources, _destination = arguments.split()
            # ${TORCH_FIND_LINKS:-pyproject.toml}: a file that is there when the arg is unset
            copied.update(re.sub(r"\$\{\w+:-(.*)\}", r"\1", s).rstrip("/") for s in sources)
    # wheels/ is the folder TORCH_FIND_LINKS names where it is used (deploy/local-images.sh)
    assert copied | {"wheels"} == allowed
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
    for pattern in ("**/*.safetensors", "**/*-ubyte", "**/*-ubyte.gz"):
        assert pattern in patterns


def test_default_command_serves_the_api_on_the_exposed_port() -> None:
    args = parse_iwae(image_cmd())
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert args.port == serve_default_port()
    assert exposed_ports() == {args.port}


def test_image_healthcheck_probes_a_real_route_with_python(
    get_status: Callable[[str], int],
) -> None:
    command = image_healthcheck()
    assert command[0] == "python", "no curl in the slim image"
    urls = healthcheck_urls(command)
    assert urls == [(serve_default_port(), "/healthz")]
    assert get_status("/healthz") == 200


# --- docker-compose.yml as written --------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def test_compose_services_run_the_real_iwae_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = parse_iwae(services["api"].get("command", image_cmd()))
    assert (api.command, api.host, api.port) == ("serve", "0.0.0.0", serve_default_port())
    assert parse_iwae(services["worker"]["command"]).command == "worker"
    assert services["api"]["image"] == services["worker"]["image"], "one image for both"


def test_api_port_and_healthcheck_match_the_server(
    compose: dict[str, Any], get_status: Callable[[str], int]
) -> None:
    api = compose["services"]["api"]
    targets = {int(str(port).rsplit(":", 1)[-1]) for port in api["ports"]}
    assert targets == exposed_ports() == {serve_default_port()}
    urls = healthcheck_urls(api["healthcheck"]["test"])
    assert urls == [(serve_default_port(), "/healthz")]
    assert get_status("/healthz") == 200
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_redis_is_durable_and_never_evicts(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    source, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and source in compose["volumes"], "AOF on a named volume"
    # REDIS_IMAGE replaces it where the registry cannot be reached (deploy/local-images.sh)
    image = re.fullmatch(r"\$\{REDIS_IMAGE:-(.*)\}", redis["image"])
    assert image, redis["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", image.group(1)), "an exact version"
    check = redis["healthcheck"]
    assert "redis-cli ping" in " ".join(check["test"])
    assert go_duration_s(check["interval"]) <= 5


def test_worker_reserves_gpu_0_and_stops_gracefully(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}]
    assert go_duration_s(worker["stop_grace_period"]) >= 60
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["healthcheck"] == {"disable": True}, "the worker serves no /healthz"


def test_compose_settings_are_real_settings(compose: dict[str, Any]) -> None:
    for name in (COMPOSE_FILE, CPU_COMPOSE_FILE, GPUS_COMPOSE_FILE):
        unknown = set(IWAE_NAME.findall((ROOT / name).read_text())) - setting_env_names()
        assert not unknown, f"{name} sets variables no settings class reads: {unknown}"
    for service in IWAE_SERVICES:
        env_file = compose["services"][service]["env_file"]
        assert env_file == [{"path": ".env", "required": False}]


# --- Authentication: the API listens on 0.0.0.0, so a deployment must choose -------------


def exposure_refused(host: str, environment: dict[str, str | None]) -> bool:
    """Whether `iwae serve --host HOST` refuses to start with this container environment."""
    from app.errors import UnsafeExposure
    from app.server import check_exposure
    from app.settings import Settings

    values = {k[len("IWAE_") :].lower(): v for k, v in environment.items() if k.startswith("IWAE_")}
    try:
        check_exposure(host, Settings(**{k: v for k, v in values.items() if v}))
    except UnsafeExposure:
        return True
    return False


def test_the_image_refuses_to_serve_anonymously_by_default() -> None:
    assert exposure_refused(parse_iwae(image_cmd()).host, image_env())


@pytest.mark.parametrize(
    ("dotenv", "refused"),
    [
        (None, True),  # no .env: the api refuses to start and says why
        ("IWAE_API_TOKEN=s3cret\n", False),
        ("IWAE_ALLOW_ANONYMOUS=1\n", False),
        ("IWAE_API_TOKEN=\nIWAE_ALLOW_ANONYMOUS=0\n", True),
    ],
    ids=["no-env", "token", "anonymous", "neither"],
)
def test_the_env_file_makes_the_authentication_choice(
    compose_binary: Path, tmp_path: Path, dotenv: str | None, refused: bool
) -> None:
    """Compose passes .env to the api, whose exposed address then needs one of the two."""
    from app.server import is_loopback

    directory = copy_deploy_files(tmp_path)
    if dotenv is not None:
        (directory / ".env").write_text(dotenv)
    result = run_compose(compose_binary, directory, (COMPOSE_FILE,), "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    api = json.loads(result.stdout)["services"]["api"]
    host = parse_iwae(api["command"]).host
    assert not is_loopback(host)
    assert exposure_refused(host, {**image_env(), **api["environment"]}) is refused


def test_compose_and_env_example_explain_the_choice() -> None:
    for name in (COMPOSE_FILE, ".env.example"):
        text = (ROOT / name).read_text()
        assert "IWAE_API_TOKEN" in text and "IWAE_ALLOW_ANONYMOUS" in text, name


# --- The resolved projects (Compose's own reading) -----------------------------------------


def test_api_and_worker_share_the_broker_and_the_storage(compose_config: ComposeConfig) -> None:
    project = compose_config(COMPOSE_FILE)
    services = project["services"]
    mounts = {}
    for name in IWAE_SERVICES:
        environment = services[name]["environment"]
        broker = urlsplit(environment["IWAE_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
        assert broker.hostname in services
        volumes = {v["target"]: v["source"] for v in services[name]["volumes"]}
        for target, source in volumes.items():
            assert source in project["volumes"], f"{target} is on a named volume"
        assert environment["IWAE_HOME"] in volumes, "checkpoints and jobs on a volume"
        assert environment["IWAE_DATA_DIR"] in volumes, "the MNIST cache on a volume"
        assert environment["IWAE_HOME"] == image_env()["IWAE_HOME"]
        assert environment["IWAE_DATA_DIR"] == image_env()["IWAE_DATA_DIR"]
        mounts[name] = volumes
    assert mounts["api"] == mounts["worker"]


def test_cpu_override_drops_the_gpu_and_builds_cpu_torch(compose_config: ComposeConfig) -> None:
    gpu = compose_config(COMPOSE_FILE)["services"]
    cpu = compose_config(COMPOSE_FILE, CPU_COMPOSE_FILE)["services"]
    assert gpu["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert not cpu["worker"].get("deploy"), "no GPU reservation on a CPU-only host"
    for name in IWAE_SERVICES:
        assert gpu[name]["build"]["args"]["TORCH_VARIANT"] == dockerfile_args()["TORCH_VARIANT"]
        assert cpu[name]["build"]["args"]["TORCH_VARIANT"] == "cpu"
        assert cpu[name]["image"] != gpu[name]["image"], "the two builds do not share a tag"
        assert cpu[name]["command"] == gpu[name]["command"]
    assert cpu["api"]["image"] == cpu["worker"]["image"]
    assert cpu["worker"]["environment"]["IWAE_DEVICE"] == "cpu"


def test_gpus_override_runs_one_worker_per_gpu(compose_config: ComposeConfig) -> None:
    """Each worker service reserves one GPU of its own and is otherwise the worker."""
    services = compose_config(COMPOSE_FILE, GPUS_COMPOSE_FILE)["services"]
    workers = {name: s for name, s in services.items() if s.get("command") == ["iwae", "worker"]}
    assert len(workers) >= 2 and "worker" in workers
    gpus = []
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device.keys() == {"driver", "device_ids", "capabilities"}, "no `count`"
        gpus += device["device_ids"]
        same = {k: v for k, v in service.items() if k != "deploy"}
        assert same == {k: v for k, v in workers["worker"].items() if k != "deploy"}, name
    assert sorted(gpus) == [str(i) for i in range(len(workers))], "GPUs 0..N-1, one each"


def test_cpu_override_as_written_resets_the_deploy_section() -> None:
    worker = load_yaml(CPU_COMPOSE_FILE)["services"]["worker"]
    assert worker["deploy"] == {"!reset": {}}


# --- .env.example ---------------------------------------------------------------------------


def test_env_example_lists_exactly_the_settings() -> None:
    names = {name for name in env_example_entries() if name.startswith("IWAE_")}
    assert names == setting_env_names()


def test_env_example_documents_each_variable_in_a_comment_above_it() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for before, line in itertools.pairwise(lines):
        if re.fullmatch(r"#?\s*[A-Z][A-Z0-9_]*=.*", line):
            assert before.startswith("# ") and "=" not in before.split()[1], line


def test_env_example_shows_the_real_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every value in .env.example, set in the environment, gives the default settings."""
    from app.settings import Settings

    for name in setting_env_names():
        monkeypatch.delenv(name, raising=False)
    defaults = Settings().model_dump()
    for name, value in env_example_entries().items():
        if name.startswith("IWAE_") and value:  # an empty value means: unset
            monkeypatch.setenv(name, value)
    assert Settings().model_dump() == defaults


def test_env_example_holds_no_secret() -> None:
    entries = env_example_entries()
    assert entries["IWAE_API_TOKEN"] == ""
    for line in (ROOT / ".env.example").read_text().splitlines():
        if re.fullmatch(r"[A-Z][A-Z0-9_]*=.*", line):
            pytest.fail(f"{line!r} is active: every line is a commented-out default")
