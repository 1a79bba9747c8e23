"""run_group: a study's stack group trained as one stacked model, each job kept on its own.

Real training (`models.stacked.train_stacked`, then `train_and_evaluate`'s evaluation) of a
tiny network on 40 random images, so that each job's record, model and checkpoint are the
real ones; only the data is stubbed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import TrainConfig
from models.data import Mnist
from models.progress import Progress
from models.storage import FileStorage, Storage
from models.storage.layout import CHECKPOINT_NAME, MODEL_INFO_NAME, model_key
from tests.support import TINY_NETWORK
from worker import execution
from worker.execution import run_group
from worker.jobs import FileJobStore, JobStore
from worker.settings import WorkerSettings

CONFIG = TrainConfig.from_dict(
    {"k": 2, "epochs": 2, "batch_size": 20, "train_size": 40, "eval_size": 10, "eval_k": 4}
    | {"model": TINY_NETWORK, "device": "cpu"}
).to_dict()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(worker_settings: WorkerSettings) -> JobStore:
    return FileJobStore(worker_settings.jobs_dir, lease_s=5, max_attempts=3)


@pytest.fixture
def stacked_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[TrainConfig]]:
    """Random images for the worker's MNIST; records the configs of each stacked training."""
    generator = torch.Generator().manual_seed(0)
    data = Mnist(
        train_images=torch.rand(40, 784, generator=generator),
        train_labels=torch.zeros(40, dtype=torch.int64),
        test_images=torch.rand(10, 784, generator=generator),
        test_labels=torch.zeros(10, dtype=torch.int64),
    )
    monkeypatch.setattr(execution, "load_mnist", lambda *a, **k: data)
    calls: list[list[TrainConfig]] = []
    train_stacked = execution.train_stacked

    def recording(configs: list[TrainConfig], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(configs))
        return train_stacked(configs, *args, **kwargs)

    monkeypatch.setattr(execution, "train_stacked", recording)
    return calls


def create(store: JobStore, **changes: Any) -> str:
    return store.create({**CONFIG, **changes}).job_id


def model_info(settings: WorkerSettings, job_id: str, storage: Storage | None = None) -> Any:
    data = (storage or FileStorage(settings.home)).get(model_key(job_id, MODEL_INFO_NAME))
    return None if data is None else json.loads(data)


def test_a_group_trains_in_one_stacked_run_and_each_job_gets_its_own_model(
    worker_settings: WorkerSettings,
    store: JobStore,
    storage: Storage,
    stacked_calls: list[list[TrainConfig]],
    tmp_path: Path,
) -> None:
    job_ids = [create(store, seed=seed) for seed in (0, 1, 2)]

    outcomes = run_group(job_ids, worker_settings, store, storage=storage)

    assert outcomes == dict.fromkeys(job_ids, "succeeded")
    assert [[c.seed for c in configs] for configs in stacked_calls] == [[0, 1, 2]]
    bounds = set()
    for seed, job_id in enumerate(job_ids):
        record = store.get(job_id)
        assert (record.status, record.model_id) == ("succeeded", job_id)
        assert record.metrics is not None and record.metrics["epochs"] == 2
        assert record.progress is not None and record.progress["phase"] != "train"  # evaluated
        info = model_info(worker_settings, job_id, storage)
        assert (info["model_id"], info["config"]["seed"]) == (job_id, seed)
        checkpoint = tmp_path / f"{job_id}.safetensors"
        checkpoint.write_bytes(storage.get(model_key(job_id, CHECKPOINT_NAME)) or b"")
        assert load_checkpoint(checkpoint).config.seed == seed
        bounds.add(record.metrics["test_loglik"])
    assert len(bounds) == 3  # three models, not one model three times


def test_a_diverging_member_and_a_refused_claim_fail_alone(
    worker_settings: WorkerSettings, store: JobStore, stacked_calls: list[list[TrainConfig]]
) -> None:
    good = create(store, seed=0)
    diverging = create(store, seed=1, learning_rate=1e30)  # its weights overflow at once
    other, cancelled = create(store, seed=2), create(store, seed=3)
    store.request_cancel(cancelled)  # queued: cancelled at once, its claim refused

    outcomes = run_group([good, diverging, other, cancelled], worker_settings, store)

    assert outcomes == {
        good: "succeeded",
        diverging: "failed",
        other: "succeeded",
        cancelled: "dropped",
    }
    assert [[c.seed for c in configs] for configs in stacked_calls] == [[0, 1, 2]]
    assert store.get(diverging).error is not None and "diverged" in store.get(diverging).error
    assert store.get(diverging).model_id is None
    assert model_info(worker_settings, diverging) is None
    assert store.get(cancelled).status == "cancelled"
    for job_id in (good, other):
        assert model_info(worker_settings, job_id)["model_id"] == job_id


def test_cancelling_a_member_stops_only_it(
    worker_settings: WorkerSettings,
    store: JobStore,
    stacked_calls: list[list[TrainConfig]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_ids = [create(store, seed=seed) for seed in (0, 1, 2)]
    steps: list[int] = []
    reporter = execution.ProgressReporter.__call__

    def cancel_the_second(self: execution.ProgressReporter, progress: Progress) -> bool:
        if self.lease.job_id == job_ids[1] and progress.phase == "train":
            steps.append(progress.done)
            if len(steps) == 1:
                store.request_cancel(job_ids[1])
                time.sleep(0.3)  # several heartbeats (every 0.05 s): one brings the flag back
        return reporter(self, progress)

    monkeypatch.setattr(execution.ProgressReporter, "__call__", cancel_the_second)

    outcomes = run_group(job_ids, worker_settings, store)

    assert outcomes == {job_ids[0]: "succeeded", job_ids[1]: "cancelled", job_ids[2]: "succeeded"}
    assert len(steps) == 1  # it stopped at its first step; the others trained all four
    assert store.get(job_ids[1]).model_id is None
    assert list((worker_settings.models_dir / job_ids[1]).glob("*")) == []  # discarded
    for job_id in (job_ids[0], job_ids[2]):
        assert store.get(job_id).metrics["steps"] == 4  # type: ignore[index]
