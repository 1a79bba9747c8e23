"""POST /studies and the study routes, on the file store with the fake queue.

The cells' jobs are moved through their lifecycle directly in the API's job store (claim,
finish), as a worker would, so every status a study can show is reached without training.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.deps import get_group_queue
from models.config import TrainConfig
from models.data import DataError
from models.study.cache import StudyReports
from models.study.report import FIGURE_NAMES
from tests.conftest import write_model
from worker.jobs import JobStore, Lease

SMALL = {"epochs": 1, "train_size": 100, "batch_size": 50, "eval_size": 10, "eval_k": 5}
GRID = {"ks": [1, 5], "objectives": ["vae", "iwae"], "seeds": [0, 1]}  # 8 cells


def post(client: TestClient, **body: Any) -> Any:
    return client.post("/studies", json={**SMALL, **body})


def store_of(client: TestClient) -> JobStore:
    return client.app.state.store  # type: ignore[attr-defined]


def metrics(loglik: float, snr_encoder: float = 2.0, snr_decoder: float = 0.5) -> dict[str, Any]:
    return {
        "test_loglik": loglik,
        "test_loglik_std_error": 0.1,
        "test_elbo": loglik - 3.0,
        "test_gap": 3.0,
        "active_units": [3],
        "seconds_per_epoch": 0.5,
        "images_per_s": 200.0,
        "gradient_snr": {
            "encoder": {"rms": snr_encoder},
            "decoder": {"rms": snr_decoder},
        },
    }


def move(store: JobStore, job_id: str, status: str, **fields: Any) -> Lease | None:
    """Bring a queued job to `status` as a worker would (claim, then finish); the lease."""
    if status == "queued":
        return None
    lease = store.claim(job_id, "test-host:1")
    if status != "running":
        store.finish(lease, status, **fields)  # type: ignore[arg-type]
    return lease


def job_ids(study: dict[str, Any]) -> list[str]:
    return [cell["job_id"] for cell in study["cells"]]


# --- creation -----------------------------------------------------------------------------


def test_a_study_answers_202_with_location_and_queues_every_cell_at_once(
    client: TestClient, fake_queue
) -> None:
    response = post(client, **GRID)
    assert response.status_code == 202
    study = response.json()
    assert response.headers["location"] == f"/studies/{study['study_id']}"
    assert study["status"] == "queued"
    assert (study["ks"], study["objectives"], study["seeds"]) == ([1, 5], ["vae", "iwae"], [0, 1])
    grid = [(c["objective"], c["k"], c["seed"]) for c in study["cells"]]
    assert grid == [(o, k, s) for o in ("vae", "iwae") for k in (1, 5) for s in (0, 1)]
    # All sent at once, none waits for another: a message per K, its seeds and objectives
    # stacked in one worker.
    ids = job_ids(study)
    assert fake_queue.groups == [[ids[i] for i in (0, 1, 4, 5)], [ids[i] for i in (2, 3, 6, 7)]]
    assert client.get(response.headers["location"]).json()["cells"] == study["cells"]

    for cell in study["cells"]:
        job = client.get(f"/jobs/{cell['job_id']}").json()
        assert job["study_id"] == study["study_id"]
        config = job["config"]
        assert (config["objective"], config["k"], config["seed"]) == (
            cell["objective"],
            cell["k"],
            cell["seed"],
        )
        assert config["snr_draws"] == 100  # every cell measures its gradient SNR
        assert {name: config[name] for name in SMALL} == SMALL  # the shared fields


def test_every_train_field_applies_to_each_cell(client: TestClient) -> None:
    body = {
        "ks": [5, 50],
        "objectives": ["iwae", "vr-iwae"],
        "alpha": 0.3,  # goes to the VR-IWAE cells only
        "preset": "burda",
        "epochs": 2,  # over the preset's 3280
        "eval_size": 10,
        "layers": 2,
        "snr_draws": 20,
        "k_schedule": "linear",
        "k_min": 5,
    }
    study = client.post("/studies", json=body).json()
    configs = {
        (c["objective"], c["k"]): client.get(f"/jobs/{c['job_id']}").json()["config"]
        for c in study["cells"]
    }
    assert configs["iwae", 5]["alpha"] is None
    assert configs["vr-iwae", 50]["alpha"] == 0.3
    for config in configs.values():
        assert (config["batch_size"], config["schedule"], config["epochs"]) == (20, "burda", 2)
        assert config["model"]["layers"] == 2
        assert (config["snr_draws"], config["k_min"]) == (20, 5)
    assert study["config"]["snr_draws"] == 20


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "ks"),  # required
        ({"ks": []}, "ks: give at least one value"),
        ({"ks": [1, 5, 1]}, "ks: repeated 1"),
        ({"ks": [0]}, "ks: 0 is outside"),
        ({"ks": list(range(1, 14))}, "ks: at most 12"),
        ({"ks": [1], "objectives": []}, "objectives: give at least one value"),
        ({"ks": [1], "objectives": ["iwae", "iwae"]}, "objectives: repeated iwae"),
        ({"ks": [1], "objectives": ["gan"]}, "objectives"),
        ({"ks": [1], "seeds": []}, "seeds: give at least one value"),
        ({"ks": [1], "seeds": [3, 3]}, "seeds: repeated 3"),
        ({"ks": [1], "seeds": list(range(11))}, "seeds: at most 10"),
        ({"ks": [1], "k": 5}, "Extra inputs"),  # the grid's axes are not train fields here
        ({"ks": [1], "objective": "iwae"}, "Extra inputs"),
        ({"ks": [1], "seed": 3}, "Extra inputs"),
        ({"ks": [1], "learning_rte": 0.1}, "Extra inputs"),
        ({"ks": [1], "epochs": 0}, "epochs"),
        ({"ks": [1], "alpha": 0.5}, "alpha applies only to"),  # no VR-IWAE objective
        ({"ks": [1, 5], "k_schedule": "linear", "k_min": 3}, "cell vae-k1-s0: k_min"),
        ({"ks": [1], "snr_draws": 3}, "snr_draws"),
    ],
)
def test_a_bad_study_is_422_saying_why_and_queues_nothing(
    client: TestClient, fake_queue, body: dict[str, Any], says: str
) -> None:
    response = client.post("/studies", json=body)
    assert response.status_code == 422
    assert says in str(response.json()["detail"])
    assert fake_queue.job_ids == []
    assert client.get("/studies").json()["studies"] == []
    assert client.get("/jobs").json()["jobs"] == []


def test_a_grid_over_the_study_job_limit_is_422(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_study_jobs=7)
    response = post(client, **GRID)
    assert response.status_code == 422
    assert "2 x 2 x 2 = 8 cells, more than the 7 allowed" in response.json()["detail"][0]["msg"]
    assert post(client, **{**GRID, "seeds": [0]}).status_code == 202


def test_a_cell_over_the_compute_budget_is_422_naming_the_setting(
    client: TestClient, fake_queue
) -> None:
    # K=5000 with batches of 100 is 500,000 samples a step; K=1 would pass.
    response = post(client, ks=[1, 5000], batch_size=100)
    assert response.status_code == 422
    error, flops = response.json()["detail"]
    assert error["ctx"]["setting"] == "IWAE_MAX_SAMPLES_PER_STEP"
    assert "5000*1*100" in error["msg"]
    assert flops["ctx"]["setting"] == "IWAE_MAX_STEP_FLOPS"
    assert fake_queue.job_ids == []


def test_a_study_that_would_pass_the_active_job_cap_is_429_and_stores_nothing(
    make_client: Callable[..., TestClient], fake_queue
) -> None:
    client = make_client(max_active_jobs=6)
    assert client.post("/train", json={"k": 5}).status_code == 202
    assert client.post("/train", json={"k": 5}).status_code == 202

    response = post(client, ks=[1, 5], objectives=["vae", "iwae", "miwae"])  # 6 cells: 8 > 6
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert "2 jobs are queued or running, and 6 more" in response.json()["detail"]
    assert client.get("/studies").json()["studies"] == []
    assert len(client.get("/jobs").json()["jobs"]) == 2
    assert len(fake_queue.job_ids) == 2

    assert post(client, ks=[1, 5], objectives=["vae", "iwae"]).status_code == 202  # 6 of 6


def test_writes_need_the_token_when_one_is_set(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_token="s3cret")
    assert post(client, ks=[1]).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    created = client.post("/studies", json={**SMALL, "ks": [1]}, headers=auth)
    assert created.status_code == 202
    cancel = f"/studies/{created.json()['study_id']}/cancel"
    assert client.post(cancel).status_code == 401
    assert client.post(cancel, headers=auth).status_code == 202
    assert client.get(created.headers["location"]).status_code == 200  # reads stay open


def test_a_failing_broker_still_leaves_the_study_recorded(client: TestClient) -> None:
    def broken(job_ids: list[str]) -> None:
        raise ConnectionError("broker down")

    client.app.dependency_overrides[get_group_queue] = lambda: broken  # type: ignore[attr-defined]
    response = post(client, ks=[1])
    assert response.status_code == 202
    assert client.get(response.headers["location"]).json()["status"] == "queued"


# --- status and results -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["queued", "queued", "queued", "queued"], "queued"),
        (["running", "queued", "queued", "queued"], "running"),
        (["succeeded", "queued", "queued", "queued"], "running"),
        (["succeeded", "succeeded", "succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed", "succeeded", "succeeded"], "partial"),
        (["failed", "failed", "failed", "failed"], "failed"),
        (["succeeded", "cancelled", "cancelled", "succeeded"], "cancelled"),
    ],
)
def test_the_study_status_follows_its_cells(
    client: TestClient, statuses: list[str], expected: str
) -> None:
    study = post(client, ks=[1, 5]).json()
    store = store_of(client)
    for job_id, status in zip(job_ids(study), statuses, strict=True):
        fields = {"metrics": metrics(-100.0)} if status == "succeeded" else {}
        if status == "failed":
            fields = {"error": "RuntimeError: boom"}
        move(store, job_id, status, **fields)

    shown = client.get(f"/studies/{study['study_id']}").json()
    assert shown["status"] == expected
    assert [c["status"] for c in shown["cells"]] == statuses
    listed = client.get("/studies").json()["studies"][0]
    assert listed["status"] == expected
    assert sum(listed["cells"].values()) == 4
    assert listed["cells"] == {s: statuses.count(s) for s in set(statuses)}


def test_results_as_cells_end_and_a_failed_cell_with_its_error(client: TestClient) -> None:
    study = post(client, ks=[1, 5], objectives=["iwae"], seeds=[0, 1]).json()
    store = store_of(client)
    k1s0, k1s1, k5s0, k5s1 = job_ids(study)
    move(store, k1s0, "succeeded", metrics=metrics(-100.0, 4.0, 1.0))
    move(store, k1s1, "succeeded", metrics=metrics(-102.0, 4.0, 1.0))
    move(store, k5s0, "failed", error="RuntimeError: out of memory")
    running = move(store, k5s1, "running")

    shown = client.get(f"/studies/{study['study_id']}").json()
    assert shown["status"] == "running"
    failed = shown["cells"][2]
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: out of memory")
    assert shown["cells"][3]["status"] == "running"
    k1, k5 = shown["results"]["summary"]
    assert (k1["k"], k1["n"], k1["seeds"]) == (1, 2, [0, 1])
    assert k1["test_loglik"]["mean"] == pytest.approx(-101.0)
    assert k1["test_loglik"]["sd"] == pytest.approx(2**0.5)  # sample sd of -100, -102
    assert k5["n"] == 0

    assert running is not None
    store.finish(running, "succeeded", metrics=metrics(-90.0, 2.0, 2.0))
    done = client.get(f"/studies/{study['study_id']}").json()
    assert done["status"] == "partial"
    assert done["results"]["summary"][1]["test_loglik"]["mean"] == -90.0
    # log SNR against log K through (1, 4) and (5, 2) for the encoder: slope log(1/2)/log 5.
    slopes = done["results"]["snr_slopes"]["iwae"]
    assert slopes["encoder"] == pytest.approx(-0.430677, abs=1e-6)
    assert client.get(f"/studies/{study['study_id']}/results.json").json() == done["results"]


def test_a_cell_whose_job_record_is_missing_is_shown_as_missing(
    client: TestClient, settings: Any
) -> None:
    """E.g. the file store's API died between writing the study and its jobs."""
    study = post(client, ks=[1, 5], objectives=["iwae"]).json()
    store = store_of(client)
    first, second = job_ids(study)
    move(store, first, "succeeded", metrics=metrics(-100.0))
    (settings.jobs_dir / f"{second}.json").unlink()

    shown = client.get(f"/studies/{study['study_id']}")
    assert shown.status_code == 200
    assert [c["status"] for c in shown.json()["cells"]] == ["succeeded", "missing"]
    assert shown.json()["status"] == "partial"
    results = client.get(f"/studies/{study['study_id']}/results.json").json()
    assert "job record is missing" in results["cells"][1]["error"]
    assert results["cells"][1]["config"]["k"] == 5
    assert client.get("/studies").json()["studies"][0]["cells"] == {"succeeded": 1, "missing": 1}
    assert client.post(f"/studies/{study['study_id']}/cancel").status_code == 202


# --- listing ------------------------------------------------------------------------------


def test_studies_are_paged_newest_first(client: TestClient) -> None:
    created = [post(client, ks=[k]).json()["study_id"] for k in (1, 2, 3, 4, 5)]
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/studies", params=params).json()
        seen += [study["study_id"] for study in page["studies"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created[::-1]
    assert client.get("/studies", params={"cursor": "../etc"}).status_code == 422


def test_jobs_filtered_by_study_page_through_every_cell_once(client: TestClient) -> None:
    study = post(client, **GRID).json()
    other = post(client, ks=[7]).json()
    client.post("/train", json={"k": 5})
    seen, cursor = [], None
    while True:
        params = {"study_id": study["study_id"], "limit": 3} | (
            {"cursor": cursor} if cursor else {}
        )
        page = client.get("/jobs", params=params).json()
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(job_ids(study))  # 8 cells created at once, none skipped
    assert len(seen) == 8
    # The unfiltered listing pages through them too, with the other study's and the job.
    everything, cursor = [], None
    while True:
        page = client.get("/jobs", params={"limit": 3} | ({"cursor": cursor} if cursor else {}))
        everything += [job["job_id"] for job in page.json()["jobs"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert len(everything) == len(set(everything)) == 8 + 2 + 1
    assert set(job_ids(study)) | set(job_ids(other)) <= set(everything)

    filtered = client.get("/jobs", params={"study_id": study["study_id"], "status": "queued"})
    assert len(filtered.json()["jobs"]) == 8
    assert client.get("/jobs", params={"study_id": "0" * 32}).json() == {
        "jobs": [],
        "next_cursor": None,
    }


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ""),
        ("GET", "/results.json"),
        ("GET", "/report"),
        ("GET", "/figures/loglik.png"),
        ("POST", "/cancel"),
    ],
)
def test_an_unknown_study_is_404_json(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, f"/studies/{'f' * 32}{path}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"no study with id {'f' * 32!r}"}


def test_an_unknown_figure_is_404_naming_the_figures(client: TestClient) -> None:
    study = post(client, ks=[1]).json()
    response = client.get(f"/studies/{study['study_id']}/figures/pie.png")
    assert response.status_code == 404
    assert all(name in response.json()["detail"] for name in FIGURE_NAMES)


def test_the_report_is_409_until_a_cell_has_succeeded(client: TestClient) -> None:
    study = post(client, ks=[1, 5], objectives=["iwae"]).json()
    first, _ = job_ids(study)
    move(store_of(client), first, "failed", error="RuntimeError: boom")
    for path in ("/report", "/figures/loglik.png"):
        response = client.get(f"/studies/{study['study_id']}{path}")
        assert response.status_code == 409
        assert response.json()["detail"] == (
            "the report needs at least one succeeded cell; the cells are now 1 failed, 1 queued"
        )


# --- cancel -------------------------------------------------------------------------------


def test_cancel_stops_the_unfinished_cells_and_keeps_the_finished(client: TestClient) -> None:
    study = post(client, ks=[1, 5], objectives=["iwae"], seeds=[0, 1]).json()
    store = store_of(client)
    done, running, _, failed = job_ids(study)
    move(store, done, "succeeded", metrics=metrics(-100.0))
    lease = move(store, running, "running")
    move(store, failed, "failed", error="RuntimeError: boom")

    response = client.post(f"/studies/{study['study_id']}/cancel")
    assert response.status_code == 202
    cells = response.json()["cells"]
    assert [c["status"] for c in cells] == ["succeeded", "running", "cancelled", "failed"]
    assert client.get(f"/jobs/{running}").json()["cancel_requested"]  # stops at its heartbeat
    assert response.json()["status"] == "running"

    assert lease is not None and store.renew(lease) == "cancel"  # what its heartbeat hears
    store.finish(lease, "cancelled")
    again = client.post(f"/studies/{study['study_id']}/cancel")
    assert again.status_code == 202
    assert again.json()["status"] == "cancelled"
    assert [c["status"] for c in again.json()["cells"]] == [
        "succeeded",
        "cancelled",
        "cancelled",
        "failed",
    ]


# --- the report ---------------------------------------------------------------------------


@pytest.fixture
def test_images(client: TestClient) -> list[int]:
    """Random grey test digits instead of MNIST's; counts how often they are read."""
    reads: list[int] = []

    def load() -> torch.Tensor:
        reads.append(1)
        return torch.rand(16, 784, generator=torch.Generator().manual_seed(0))

    load_test_images_with(client, load)
    return reads


def load_test_images_with(client: TestClient, load: Callable[[], torch.Tensor]) -> None:
    """Reports built by the app read their test digits through `load` instead of MNIST."""
    app = client.app  # type: ignore[attr-defined]
    app.state.reports = StudyReports(
        app.state.registry.storage,
        app.state.settings.cache_dir,
        app.state.registry.checkpoint,
        load,
    )


def finish_with_model(
    client: TestClient, job_id: str, config: TrainConfig, loglik: float, snr: float
) -> None:
    """A succeeded cell whose model is listed, as the worker leaves it."""
    settings = client.app.state.settings  # type: ignore[attr-defined]
    write_model(settings.models_dir, job_id, config, seed=len(job_id))
    move(
        store_of(client),
        job_id,
        "succeeded",
        metrics=metrics(loglik, snr, 1 / snr),
        model_id=job_id,
    )


def test_a_build_deletes_the_reports_of_studies_not_built_for_the_retention(
    client: TestClient, tiny_config: TrainConfig, test_images: list[int]
) -> None:
    """Report folders grew with every study ever reported; study records expire after
    IWAE_JOB_RETENTION_S, and so do reports not built again for as long."""
    reports = client.app.state.reports  # type: ignore[attr-defined]
    reports.retention_s = 3600.0
    old = reports.root / ("0" * 32)
    (old / "fingerprint").mkdir(parents=True)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    recent = reports.root / ("1" * 32)
    recent.mkdir()
    study = post(client, ks=[1], objectives=["iwae"]).json()
    finish_with_model(client, job_ids(study)[0], tiny_config, -100.0, 2.0)

    assert client.get(f"/studies/{study['study_id']}/report").status_code == 200
    assert not old.exists()
    assert recent.exists()


def test_the_report_shows_the_numbers_of_results_json_and_its_figures(
    client: TestClient, tiny_config: TrainConfig, test_images: list[int]
) -> None:
    study = post(client, ks=[1, 5], objectives=["vae", "iwae"]).json()
    sid = study["study_id"]
    cells = job_ids(study)
    for i, job_id in enumerate(cells[:3]):
        finish_with_model(client, job_id, tiny_config, -100.0 + i, 2.0 + i)

    report = client.get(f"/studies/{sid}/report")
    assert report.status_code == 200
    assert report.headers["content-type"].startswith("text/html")
    page = report.text
    assert "<img" in page and "data:image/png;base64," in page  # self-contained
    assert 'src="http' not in page and 'src="figures/' not in page
    for name in FIGURE_NAMES:
        figure = client.get(f"/studies/{sid}/figures/{name}.png")
        assert figure.status_code == 200, name
        assert figure.headers["content-type"] == "image/png"
        assert figure.content.startswith(b"\x89PNG\r\n\x1a\n")

    # The report was built from exactly the numbers of results.json.
    folders = [f for f in (client.app.state.settings.home / "studies" / sid).iterdir()]  # type: ignore[attr-defined]
    [folder] = folders
    results = client.get(f"/studies/{sid}/results.json").json()
    assert json.loads((folder / "results.json").read_text()) == results
    for row in results["summary"]:
        if row["n"]:
            assert f"{row['test_loglik']['mean']:.2f}" in page
    assert test_images == [1]  # read once, then kept

    # Read again: the same report (not rebuilt); once the last cell ends, a new one.
    assert client.get(f"/studies/{sid}/report").text == page
    assert [f.name for f in folder.parent.iterdir()] == [folder.name]
    finish_with_model(client, cells[3], tiny_config, -90.0, 5.0)
    again = client.get(f"/studies/{sid}/report").text
    assert again != page
    assert "-90.00" in again
    assert client.get(f"/studies/{sid}").json()["status"] == "succeeded"


def test_a_report_without_mnist_is_503(client: TestClient, tiny_config: TrainConfig) -> None:
    def unreadable() -> torch.Tensor:
        raise DataError("MNIST file t10k-images-idx3-ubyte is missing: looked in /secret/path")

    load_test_images_with(client, unreadable)
    study = post(client, ks=[1], objectives=["iwae"]).json()
    finish_with_model(client, job_ids(study)[0], tiny_config, -100.0, 2.0)
    response = client.get(f"/studies/{study['study_id']}/report")
    assert response.status_code == 503
    assert "MNIST test images" in response.json()["detail"]
    assert "/secret" not in response.json()["detail"]
