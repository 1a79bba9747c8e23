"""K studies end to end: the API (in this process, on the test Redis) queues the cells, real
worker processes train them on real MNIST, and the study, its results and its report are
read back through the API.

Covers: two workers share a study's cells, each training a group of cells of one K stacked
in one task, and it ends `succeeded` with a report whose numbers are those of results.json;
a cell that fails in training leaves the study `partial` with the others reported; cancel;
a worker SIGKILLed mid-study (with its group), and the study completing, its cells resumed
alone.
Every wait is bounded; none assumes a job is still running when looked at, unless the job
is long enough (hundreds of steps) to be caught at it on a busy machine.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from models.study.report import FIGURE_NAMES
from models.study.results import SNR_SUMMARY
from tests.integration.service import Service
from tests.support import TINY_NETWORK, wait_until

pytestmark = pytest.mark.integration

# A few seconds a cell on two busy cores, SNR included.
CELL = {
    **TINY_NETWORK,
    "epochs": 2,
    "batch_size": 50,
    "train_size": 200,
    "eval_size": 20,
    "eval_k": 10,
    "snr_draws": 8,
}
# 3000 steps (seconds on an idle machine): still running when a test looks for it.
LONG_CELL = {**CELL, "epochs": 30, "train_size": 1000, "batch_size": 10}
ENDED = ("succeeded", "partial", "failed", "cancelled")


@pytest.fixture
def service(redis_service: Service, monkeypatch: pytest.MonkeyPatch) -> Service:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers and the API on two cores
    return redis_service


@pytest.fixture
def api(service: Service) -> Iterator[TestClient]:
    """The API on the service's Redis, sending real Celery messages."""
    settings = Settings(**service.settings.model_dump())
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def start_workers(service: Service, n: int) -> None:
    """Start `n` workers and wait until each consumes the queue (Celery's "ready")."""
    for _ in range(n):
        service.start_worker()
    wait_until(
        lambda: service.log_text().count(" ready.") >= n,
        f"{n} workers to be ready",
        120,
        interval=0.1,
        details=service.logs,
    )


def wait_study(
    api: TestClient,
    service: Service,
    study_id: str,
    until: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 240.0,
) -> dict[str, Any]:
    """Poll GET /studies/{study_id} until `until(study)` (`Service.poll`)."""

    def read() -> dict[str, Any]:
        response = api.get(f"/studies/{study_id}")
        assert response.status_code == 200, response.text
        return response.json()

    return service.poll(read, until, timeout, what)


def ended(study: dict[str, Any]) -> bool:
    return study["status"] in ENDED


def submit(api: TestClient, **body: Any) -> dict[str, Any]:
    response = api.post("/studies", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_a_study_runs_on_two_workers_and_its_report_shows_results_json(
    service: Service, api: TestClient
) -> None:
    start_workers(service, 2)
    study = submit(api, **CELL, ks=[1, 2], objectives=["vae", "iwae"])
    done = wait_study(api, service, study["study_id"], ended, "the study to end")

    assert done["status"] == "succeeded", done
    records = [service.store.get(cell["job_id"]) for cell in done["cells"]]
    assert {r.status for r in records} == {"succeeded"}
    assert {r.study_id for r in records} == {study["study_id"]}
    assert [r.attempts for r in records] == [1, 1, 1, 1]
    assert len({r.worker for r in records}) == 2, [r.worker for r in records]  # both ran cells
    # One message per K (its vae and iwae cells), trained stacked by the worker that took it.
    for k in (1, 2):
        assert len({r.worker for r in records if r.config["k"] == k}) == 1, records
    assert service.log_text().count("Task iwae.train_group[") >= 2, service.logs()
    assert "Task iwae.train[" not in service.log_text()
    jobs = api.get("/jobs", params={"study_id": study["study_id"]}).json()["jobs"]
    assert sorted(j["job_id"] for j in jobs) == sorted(r.job_id for r in records)

    # Every number of the summary is its cell's (one seed each).
    results = done["results"]
    for row, record in zip(results["summary"], records, strict=True):
        assert record.metrics is not None
        assert (row["objective"], row["k"], row["n"]) == (
            record.config["objective"],
            record.config["k"],
            1,
        )
        assert row["test_loglik"]["mean"] == record.metrics["test_loglik"]
        assert row["snr_encoder"]["mean"] == record.metrics["gradient_snr"]["encoder"][SNR_SUMMARY]
    assert api.get(f"/studies/{study['study_id']}/results.json").json() == results

    report = api.get(f"/studies/{study['study_id']}/report")
    assert report.status_code == 200
    assert "data:image/png;base64," in report.text
    for row in results["summary"]:
        assert f"{row['test_loglik']['mean']:.2f}" in report.text
    for name in FIGURE_NAMES:
        figure = api.get(f"/studies/{study['study_id']}/figures/{name}.png")
        assert figure.status_code == 200, name
        assert figure.content.startswith(b"\x89PNG")


def test_a_cell_that_fails_in_training_leaves_the_study_partial(
    service: Service, api: TestClient
) -> None:
    study = submit(api, **CELL, ks=[1, 2], objectives=["iwae"])
    bad, good = (cell["job_id"] for cell in study["cells"])
    # A corrupt checkpoint where the cell would resume from: valid at the API, fails in
    # training. Planted before any worker starts, so before the cell can be claimed.
    folder = service.settings.models_dir / bad
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"not a checkpoint")
    start_workers(service, 1)

    done = wait_study(api, service, study["study_id"], ended, "the study to end")
    assert done["status"] == "partial", done
    failed, succeeded = done["cells"]
    assert failed["status"] == "failed" and failed["error"], failed
    assert succeeded["status"] == "succeeded" and succeeded["model_id"] == good
    k1, k2 = done["results"]["summary"]
    assert (k1["n"], k2["n"]) == (0, 1)
    assert k2["test_loglik"]["mean"] == service.store.get(good).metrics["test_loglik"]
    assert done["results"]["cells"][0]["error"] == failed["error"]
    assert api.get(f"/studies/{study['study_id']}/report").status_code == 200


def test_cancel_ends_every_unfinished_cell(service: Service, api: TestClient) -> None:
    start_workers(service, 1)
    study = submit(api, **{**LONG_CELL, "epochs": 1000}, ks=[1, 2], objectives=["iwae"])
    wait_study(
        api,
        service,
        study["study_id"],
        lambda s: any(c["status"] == "running" and c["progress"] for c in s["cells"]),
        "a cell training",
    )
    response = api.post(f"/studies/{study['study_id']}/cancel")
    assert response.status_code == 202
    assert "queued" not in [c["status"] for c in response.json()["cells"]]  # cancelled at once

    done = wait_study(api, service, study["study_id"], ended, "the study to end", timeout=60)
    assert done["status"] == "cancelled"
    assert [c["status"] for c in done["cells"]] == ["cancelled", "cancelled"]
    for cell in done["cells"]:
        assert not (service.settings.models_dir / cell["job_id"] / "model.json").exists()


def test_a_study_completes_when_a_worker_is_sigkilled_mid_study(
    service: Service, api: TestClient
) -> None:
    start_workers(service, 2)
    study = submit(api, **LONG_CELL, ks=[1, 2], objectives=["vae", "iwae"])
    ids = [cell["job_id"] for cell in study["cells"]]

    def running_past_a_checkpoint(_: dict[str, Any]) -> bool:
        return any(
            (r := service.store.get(job_id)).status == "running" and r.model_id is not None
            for job_id in ids
        )

    wait_study(api, service, study["study_id"], running_past_a_checkpoint, "a checkpoint")
    victim = next(r for r in map(service.store.get, ids) if r.status == "running" and r.model_id)
    pid = int(victim.worker.rsplit(":", 1)[1])
    worker = next(w for w in service.workers if w.pid == pid)
    service.signal_worker(worker, signal.SIGKILL)
    assert service.store.get(victim.job_id).status == "running"  # nobody knows yet

    done = wait_study(api, service, study["study_id"], ended, "the study to end", timeout=300)
    assert done["status"] == "succeeded", f"{done}\n{service.logs()}"
    # The victim's group (its K's two cells) was lost with it; each cell resumed alone.
    for record in map(service.store.get, ids):
        if record.config["k"] == victim.config["k"]:
            assert record.attempts == 2  # lost once, then resumed by the other worker
            assert record.worker != victim.worker
    assert all(row["n"] == 1 for row in done["results"]["summary"])
