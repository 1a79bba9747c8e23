"""The service on an object store (`IWAE_STORAGE_URL=s3://...`): real workers and the API
with different IWAE_HOME folders, so that a model reaches the API only through the store,
an S3 API server on loopback (moto), the test Redis and real MNIST.

Covers: a job trains, its worker is SIGKILLed, and another worker resumes it from the
checkpoint in the store; the API lists and serves the model (a checkpoint downloaded once
into its cache); a study's report is built, stored, and served by a second API host from
the store without being rebuilt.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from models.checkpoint import load_checkpoint
from models.storage import Storage
from models.storage.layout import CHECKPOINT_NAME, MODEL_INFO_NAME, model_key, report_prefix
from models.study.report import REPORT_NAME
from tests.integration.conftest import distributed_service
from tests.integration.service import Service

pytestmark = pytest.mark.integration

CELL = {"epochs": 1, "batch_size": 50, "train_size": 200, "eval_size": 20, "eval_k": 10}


@pytest.fixture
def service(tmp_path: Path, s3_url: str) -> Iterator[Service]:
    """Workers on the bucket of `s3_url` (the AWS_* variables are set for them)."""
    yield from distributed_service(tmp_path, home=tmp_path / "worker-home", storage_url=s3_url)


def api(service: Service, home: Path) -> TestClient:
    """An API host of the service with an IWAE_HOME of its own."""
    settings = Settings(**{**service.settings.model_dump(), "home": home})
    return TestClient(create_app(settings), raise_server_exceptions=False)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_train_resume_serve_and_report_through_the_store(service: Service, tmp_path: Path) -> None:
    storage: Storage = service.settings.open_storage()
    first = service.start_worker()
    job_id = service.submit(epochs=10, train_size=3000, eval_size=50)
    service.wait_checkpointed(job_id)
    service.signal_worker(first, signal.SIGKILL)
    stored = storage.fetch(model_key(job_id, CHECKPOINT_NAME))
    assert stored is not None
    done_epochs = load_checkpoint(stored).state.epoch
    assert 1 <= done_epochs < 10

    service.start_worker()
    resumed = service.wait_resumed(job_id, timeout=60)
    assert resumed.progress["epoch"] >= done_epochs + 1, resumed.progress  # not restarted
    record = service.wait_finished(job_id, timeout=120)
    assert record.status == "succeeded", f"{record}\n{service.logs()}"
    final = storage.fetch(model_key(job_id, CHECKPOINT_NAME))
    assert final is not None and load_checkpoint(final).state.epoch == 10
    assert storage.stat(model_key(job_id, MODEL_INFO_NAME)) is not None
    # The worker's own folder keeps no model: its downloads are removed after training.
    assert not (service.settings.models_dir / job_id).exists()

    api_home = tmp_path / "api-home"
    with api(service, api_home) as client:
        [listed] = client.get("/models").json()["models"]
        assert listed["model_id"] == job_id
        assert listed["metrics"]["epochs"] == 10
        samples = client.get("/samples", params={"n": 4, "model_id": job_id})
        assert samples.status_code == 200, samples.text
        assert samples.content.startswith(b"\x89PNG")
        assert client.get("/samples", params={"n": 4}).status_code == 200  # the newest

        study = client.post("/studies", json={**CELL, "ks": [1], "objectives": ["iwae"]})
        assert study.status_code == 202, study.text
        study_id = study.json()["study_id"]
        service.poll(
            lambda: client.get(f"/studies/{study_id}").json(),
            lambda s: s["status"] == "succeeded",
            180,
            "the study to succeed",
        )
        report = client.get(f"/studies/{study_id}/report")
        assert report.status_code == 200
        assert "data:image/png;base64," in report.text
    # Nothing of the API's but downloads: the model's checkpoint once (and the study
    # cell's, for the report), the report, and no model folder of its own.
    assert files_under(api_home / "models") == []
    cached = files_under(api_home / "cache" / "models" / job_id)
    assert len(cached) == 1 and cached[0].endswith(f"-{CHECKPOINT_NAME}"), cached
    stored_report = {o.key for o in storage.list(report_prefix(study_id))}
    assert any(key.endswith("/" + REPORT_NAME) for key in stored_report), stored_report

    # Another API host serves the stored report as it is, without building it again.
    other_home = tmp_path / "other-api-home"
    with api(service, other_home) as client:
        again = client.get(f"/studies/{study_id}/report")
        assert again.status_code == 200
        assert again.text == report.text
        assert client.get(f"/studies/{study_id}/figures/samples.png").status_code == 200
    assert not (other_home / "cache" / "models").exists()  # no checkpoint was needed
