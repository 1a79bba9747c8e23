"""The Celery application: one training job at a time per worker process, JSON messages.

`celery -A worker.celery_app worker` (or `iwae worker`, see `worker.runner`) uses `app`,
built from the environment's settings. `create_celery_app(settings)` builds another, e.g. for
tests. Building an app connects to nothing and creates no folder.

Transports: Redis in the distributed mode (every key under `settings.redis_prefix`, through
kombu's `global_keyprefix`); kombu's filesystem transport under `home/broker/` in the
embedded mode, which needs no server. The message carries only the job id; the job's config
and everything a user reads live in the job store (`worker.jobs`).

Why `task_acks_late=False`: recovery does not rest on the broker redelivering messages. A
task claims its job in the job store under a lease renewed by heartbeats, and a reaper
re-queues jobs whose lease expired (see `worker.jobs`): a lost job is
queued again within `job_lease_s + 2 * reaper_interval_s` (90 s by default). With late acks a
message would instead stay unacknowledged for the whole training run, and Redis would
redeliver it every `visibility_timeout` (one hour by default) while the job still runs, or
again and again after a job that kills its worker (out of memory); the lease makes such
copies harmless, but they would be noise. Early ack plus `worker_disable_prefetch` means a
worker that dies holds no message at all.

Why the solo pool: a worker runs one training job at a time anyway (one per GPU), and the
solo pool runs it in the worker process itself, so nothing forks after torch is imported
(the CUDA-after-fork trap cannot happen), a SIGKILL stops training and heartbeats together
(the lease then expires as it should), and there is no child process to orphan. To use
several GPUs on one machine, run one `iwae worker` per GPU with `CUDA_VISIBLE_DEVICES` set.

Stopping a worker (SIGTERM, Ctrl-C: Celery's warm shutdown) stops its job at the next
training step and hands it back to the queue (`JobStore.release`, its attempt counted); it
resumes elsewhere from its last checkpoint. A second signal forces the worker out.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from typing import Any

import redis
import torch
from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from models.storage import Storage
from worker.job_files import discard_model
from worker.jobs import JobStore, ReaperThread, open_job_store, worker_name
from worker.settings import WorkerSettings, get_worker_settings

log = logging.getLogger(__name__)

TRAIN_TASK = "iwae.train"
TRAIN_GROUP_TASK = "iwae.train_group"

# Set when this worker process is asked to stop (SIGTERM, Ctrl-C): the running job stops at
# its next step and goes back to the queue for another worker, instead of the warm shutdown
# waiting for the whole training run.
shutdown_requested = threading.Event()

_reapers: list[ReaperThread] = []


class IwaeCelery(Celery):
    """A Celery app that carries the settings it was built from."""

    settings: WorkerSettings

    @cached_property
    def job_store(self) -> JobStore:
        """This process's job store, opened on first use."""
        return open_job_store(self.settings)

    @cached_property
    def storage(self) -> Storage:
        """Where this process stores models (`IWAE_STORAGE_URL`)."""
        return self.settings.open_storage()


def create_celery_app(settings: WorkerSettings) -> IwaeCelery:
    app = IwaeCelery("iwae", include=["worker.tasks"], set_as_current=False)
    app.settings = settings
    app.conf.update(celery_config(settings))
    return app


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    config: dict[str, Any] = {
        "task_default_queue": settings.queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # The lease, not redelivery, recovers lost jobs (module docstring).
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        # One job at a time, and no message reserved behind it.
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "worker_pool": "solo",
        "worker_send_task_events": False,
        "worker_hijack_root_logger": True,
        "broker_connection_retry_on_startup": True,
    }
    if settings.embedded:
        queue_dir = str(settings.broker_dir / "queue")
        config.update(
            broker_url="filesystem://",
            broker_transport_options={
                "data_folder_in": queue_dir,
                "data_folder_out": queue_dir,
                "control_folder": str(settings.broker_dir / "control"),
                "processed_folder": str(settings.broker_dir / "processed"),
                "store_processed": False,
                "polling_interval": 0.5,
            },
            # The filesystem transport has no broadcast for remote control.
            worker_enable_remote_control=False,
        )
    else:
        config.update(
            broker_url=settings.broker_url,
            broker_transport_options={"global_keyprefix": settings.redis_prefix},
            worker_disable_prefetch=True,
        )
    return config


def send_training(app: IwaeCelery, job_id: str) -> None:
    """Send the job's message to the queue of its device, then mark it sent."""
    _send(app, TRAIN_TASK, job_id, [job_id])


def send_training_group(app: IwaeCelery, job_ids: Sequence[str]) -> None:
    """Send one message for jobs of one stack group (`models.stacked.stack_groups`), to be
    trained stacked by one worker, then mark each sent; a lone job's is an ordinary message."""
    if len(job_ids) == 1:
        send_training(app, job_ids[0])
    else:
        _send(app, TRAIN_GROUP_TASK, list(job_ids), job_ids)


def _send(app: IwaeCelery, task: str, argument: str | list[str], job_ids: Sequence[str]) -> None:
    settings = app.settings
    if settings.embedded:
        prepare_storage(settings)
    device = app.job_store.get(job_ids[0]).config.get("device")  # a group shares its device
    app.send_task(task, args=[argument], queue=settings.queue_for(device))
    for job_id in job_ids:
        app.job_store.mark_enqueued(job_id)


# kombu's Redis transport keeps one list per priority step: the queue's name, then the name,
# this separator and the step (`kombu.transport.redis.Channel._q_for_pri`).
_PRIORITY_SEPARATOR = "\x06\x16"
_PRIORITY_STEPS = (0, 3, 6, 9)


def waiting_messages(settings: WorkerSettings) -> Callable[[], set[str]]:
    """A reader of the job ids whose training message waits in the broker (both queues),
    for the reaper: a message still there is not lost, and is not sent again."""
    queues = (settings.queue, settings.queue_for("cuda"))
    if settings.embedded:
        folder = settings.broker_dir / "queue"

        def read() -> Iterable[bytes]:
            for queue in queues:
                for path in folder.glob(f"*.{queue}.msg"):
                    try:
                        yield path.read_bytes()
                    except FileNotFoundError:  # taken by a worker meanwhile
                        continue

    else:
        assert settings.broker_url is not None
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=10)
        keys = [
            f"{settings.redis_prefix}{queue}{_PRIORITY_SEPARATOR}{step}" if step else
            f"{settings.redis_prefix}{queue}"
            for queue in queues
            for step in _PRIORITY_STEPS
        ]  # fmt: skip

        def read() -> Iterable[bytes]:
            for key in keys:
                yield from client.lrange(key, 0, -1)

    return lambda: {job_id for message in read() for job_id in _message_job_ids(message)}


def _message_job_ids(message: bytes) -> list[str]:
    """The job ids a training message carries (its body: base64 JSON `[[job_id], {}, ...]`,
    or `[[[job_id, ...]], {}, ...]` for a group); none for anything else."""
    try:
        job_ids = json.loads(base64.b64decode(json.loads(message)["body"]))[0][0]
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return []
    job_ids = job_ids if isinstance(job_ids, list) else [job_ids]
    return [job_id for job_id in job_ids if isinstance(job_id, str)]


def consumed_queues(settings: WorkerSettings) -> list[str]:
    """The default queue, plus the CUDA jobs' queue when this worker can run them."""
    queues = [settings.queue]
    if settings.device != "cpu" and torch.cuda.is_available():
        queues.append(settings.queue_for("cuda"))
    return queues


def prepare_storage(settings: WorkerSettings) -> None:
    """Create the folders a worker or the embedded queue writes to."""
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    if settings.embedded:
        for name in ("queue", "control", "processed"):
            (settings.broker_dir / name).mkdir(parents=True, exist_ok=True)
        settings.jobs_dir.mkdir(parents=True, exist_ok=True)


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if not isinstance(app, IwaeCelery):
        return
    settings = app.settings
    reaper = ReaperThread(
        app.job_store,
        lambda job_id: send_training(app, job_id),
        interval_s=settings.reaper_interval_s,
        resend_s=settings.resend_queued_s,
        report=lambda: app.job_store.report_worker(worker_name(), consumed_queues(settings)),
        on_settled=lambda job_id: discard_model(app.storage, job_id),
        waiting=waiting_messages(settings),
    )
    reaper.start()
    _reapers.append(reaper)
    log.info(
        "reaper started: every %.0f s; lost jobs are queued again within %.0f s",
        settings.reaper_interval_s,
        settings.recovery_bound_s,
    )


@worker_shutting_down.connect
def _request_shutdown(**_: Any) -> None:
    shutdown_requested.set()


@worker_shutdown.connect
def _stop_reaper(sender: Any = None, **_: Any) -> None:
    while _reapers:
        _reapers.pop().stop()


app = create_celery_app(get_worker_settings())
