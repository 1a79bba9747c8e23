"""The Celery configuration, and sending a job in the embedded mode (no worker needed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from worker.celery_app import (
    TRAIN_GROUP_TASK,
    TRAIN_TASK,
    consumed_queues,
    create_celery_app,
    waiting_messages,
)
from worker.jobs import FileJobStore
from worker.queue import enqueue_training, enqueue_training_group
from worker.settings import WorkerSettings


def test_one_job_at_a_time_early_ack_json() -> None:
    conf = create_celery_app(WorkerSettings(broker_url="redis://127.0.0.1:6379/14")).conf
    assert conf.worker_pool == "solo"
    assert conf.worker_concurrency == 1
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_disable_prefetch
    assert conf.task_acks_late is False
    assert conf.task_reject_on_worker_lost is False
    assert conf.task_serializer == "json"
    assert conf.accept_content == ["json"]
    assert conf.task_ignore_result


def test_redis_keys_share_the_job_store_prefix() -> None:
    settings = WorkerSettings(broker_url="redis://127.0.0.1:6379/14", redis_prefix="test-x:")
    conf = create_celery_app(settings).conf
    assert conf.broker_url == "redis://127.0.0.1:6379/14"
    assert conf.broker_transport_options["global_keyprefix"] == "test-x:"
    assert conf.task_default_queue == settings.queue


def test_embedded_app_uses_folders_under_home_and_creates_none(tmp_path: Path) -> None:
    settings = WorkerSettings(home=tmp_path / "home")
    conf = create_celery_app(settings).conf
    assert conf.broker_url == "filesystem://"
    options = conf.broker_transport_options
    assert options["data_folder_in"] == options["data_folder_out"]
    assert Path(options["data_folder_in"]).is_relative_to(settings.broker_dir)
    assert not (tmp_path / "home").exists()


def test_enqueue_training_embedded_writes_one_message(tmp_path: Path) -> None:
    settings = WorkerSettings(home=tmp_path)
    store = FileJobStore(settings.jobs_dir, lease_s=60, max_attempts=3)
    job = store.create({"k": 1})
    assert store.awaiting_message() == [job.job_id]

    enqueue_training(job.job_id, settings=settings)

    messages = list((settings.broker_dir / "queue").glob("*.msg"))
    assert len(messages) == 1
    message = json.loads(messages[0].read_text())
    assert message["headers"]["task"] == TRAIN_TASK
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([job.job_id], {})  # the id only: the config is in the store
    assert store.awaiting_message() == []


def test_the_reaper_reads_which_jobs_wait_in_the_queue(tmp_path: Path) -> None:
    settings = WorkerSettings(home=tmp_path)
    store = FileJobStore(settings.jobs_dir, lease_s=60, max_attempts=3)
    cpu, gpu = store.create({"k": 1}), store.create({"k": 1, "device": "cuda"})
    group = [store.create({"k": 1, "seed": seed}).job_id for seed in (0, 1)]
    waiting = waiting_messages(settings)
    for job in (cpu, gpu):
        enqueue_training(job.job_id, settings=settings)
    enqueue_training_group(group, settings=settings)
    (settings.broker_dir / "queue" / f"0_x.{settings.queue}.msg").write_text("not a message")

    assert waiting() == {cpu.job_id, gpu.job_id, *group}


def test_a_group_is_one_message_of_its_job_ids_each_marked_sent(tmp_path: Path) -> None:
    settings = WorkerSettings(home=tmp_path)
    store = FileJobStore(settings.jobs_dir, lease_s=60, max_attempts=3)
    group = [store.create({"k": 1, "seed": seed}).job_id for seed in (0, 1)]

    enqueue_training_group(group, settings=settings)

    [path] = (settings.broker_dir / "queue").glob("*.msg")
    message = json.loads(path.read_text())
    assert message["headers"]["task"] == TRAIN_GROUP_TASK
    args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([group], {})
    assert store.awaiting_message() == []


@pytest.mark.parametrize(
    ("device", "queue"),
    [("cuda", "iwae.training.cuda"), ("cpu", "iwae.training"), ("auto", "iwae.training")],
)
def test_a_job_goes_to_the_queue_of_its_device(tmp_path: Path, device: str, queue: str) -> None:
    settings = WorkerSettings(home=tmp_path)
    store = FileJobStore(settings.jobs_dir, lease_s=60, max_attempts=3)
    job = store.create({"k": 1, "device": device})

    enqueue_training(job.job_id, settings=settings)

    [message] = (settings.broker_dir / "queue").glob("*.msg")
    assert json.loads(message.read_text())["properties"]["delivery_info"]["routing_key"] == queue


def test_only_a_worker_with_cuda_consumes_the_cuda_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert consumed_queues(WorkerSettings()) == ["iwae.training", "iwae.training.cuda"]
    assert consumed_queues(WorkerSettings(device="cpu")) == ["iwae.training"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert consumed_queues(WorkerSettings()) == ["iwae.training"]
