"""Fault injection: small jobs on three real workers and a private Redis, while a worker is
SIGKILLed and replaced, one is SIGSTOPped past its lease and resumed, Redis restarts (AOF
on), one claim fails and one running job is cancelled. Afterwards every job has ended
exactly once, correctly, and every file was written by the holder of the job's lease.

The Redis here is a `redis-server` this test starts on a free port with its own folder, so
restarting it disturbs nothing else. About 50 s on two busy cores; every wait is bounded.

Cases of their own follow: jobs waiting behind a busy worker, a training hung in open(2),
and a Redis without AOF that crashes and forgets a claim, so that two workers hold one
fence (about 15 s: the storage keeps one attempt's files).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis

from models.checkpoint import load_checkpoint
from models.storage.layout import CHECKPOINT_NAME, METRICS_NAME, MODEL_INFO_NAME
from models.storage.local import LOCK_NAME, WRITERS_NAME
from tests.integration.conftest import distributed_service, service_settings
from tests.integration.service import Service
from tests.support import TINY_CONFIG, free_port, wait_until
from worker.celery_app import TRAIN_TASK, create_celery_app
from worker.jobs import JobRecord
from worker.queue import enqueue_training

pytestmark = pytest.mark.integration

# About 300 training steps: a few seconds on an idle core, enough to catch it running.
JOB = {**TINY_CONFIG, "k": 20, "epochs": 30, "train_size": 1000, "eval_size": 20, "eval_k": 10}
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] (.*)$")
STARTED = re.compile(r"job (\w+): started \(attempt \d+, fence (\d+)\)")
WROTE = re.compile(r"job (\w+): fence (\d+) writes (\S+)")


class PrivateRedis:
    """A redis-server of this test's own: durable (AOF, fsync at every write), or not (no
    AOF, no automatic snapshot: it comes back from its last `SAVE`, losing every later write).
    """

    def __init__(self, folder: Path, *, durable: bool = True) -> None:
        self.folder = folder
        self.durable = durable
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.folder.mkdir(exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.folder), "--appendonly", "yes" if self.durable else "no",
             "--appendfsync", "always", "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        wait_until(client.ping, "redis-server to start", 10, retry_on=(redis.ConnectionError,))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: Redis flushes its AOF and exits
            self.process.wait(timeout=10)

    def crash(self) -> None:
        """SIGKILL, as a host crash: nothing is flushed."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def restart(self) -> float:
        """Stop and start again; returns how long it was down."""
        started = time.monotonic()
        self.stop()
        self.start()
        return time.monotonic() - started


@pytest.fixture
def cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, PrivateRedis]]:
    yield from private_cluster(tmp_path, monkeypatch, durable=True)


@pytest.fixture
def lossy_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Service, PrivateRedis]]:
    """`cluster`, with a Redis that loses the writes made since its last `SAVE` when it
    crashes (no AOF)."""
    yield from private_cluster(tmp_path, monkeypatch, durable=False)


def private_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, durable: bool
) -> Iterator[tuple[Service, PrivateRedis]]:
    """Workers' settings (short timings) on a private redis-server."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three workers on two cores
    server = PrivateRedis(tmp_path / "redis", durable=durable)
    server.start()
    settings = service_settings(
        tmp_path,
        broker_url=server.url,
        heartbeat_interval_s=0.5,
        max_attempts=5,
        resend_queued_s=8.0,
        job_stall_s=30.0,
    )
    service = Service(settings, tmp_path)
    try:
        yield service, server
    finally:
        service.stop()
        server.stop()


def poll(
    what: str, condition: Callable[[], object], timeout: float, service: Service | None = None
) -> object:
    """`condition()` once truthy, riding out the Redis restart; fails at the deadline."""
    details = None if service is None else service.logs
    return wait_until(condition, what, timeout, retry_on=(redis.RedisError,), details=details)


def running_on(service: Service, job_ids: list[str], pids: set[int]) -> tuple[str, int] | None:
    """A job running past its first checkpoint on one of the workers `pids`, and its pid."""
    for job_id in job_ids:
        record = service.store.get(job_id)
        if record.status == "running" and record.model_id is not None and record.worker:
            pid = int(record.worker.rsplit(":", 1)[1])
            if pid in pids:
                return job_id, pid
    return None


def log_lines(path: Path) -> Iterator[tuple[datetime, str]]:
    """(time, message) of every line a worker logged in `path`."""
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match is not None:
            yield datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f"), match[2]


def fenced_events(log_dir: Path) -> list[tuple[datetime, str, str, int]]:
    """("claim" | "write", job, fence) events of every worker log, in time order."""
    events = []
    for path in log_dir.glob("worker-*.log"):
        for at, message in log_lines(path):
            if started := STARTED.search(message):
                events.append((at, "claim", started[1], int(started[2])))
            elif wrote := WROTE.search(message):
                events.append((at, "write", wrote[1], int(wrote[2])))
    return sorted(events)


def test_jobs_survive_killed_paused_workers_a_redis_restart_and_a_failed_claim(
    cluster: tuple[Service, PrivateRedis], capsys: pytest.CaptureFixture[str]
) -> None:
    service, server = cluster
    store = service.store
    workers: dict[int, subprocess.Popen[bytes]] = {}
    for _ in range(3):
        process = service.start_worker()
        workers[process.pid] = process
    poll("three workers", lambda: len(store.workers()) == 3, timeout=60)
    started = time.monotonic()
    jobs = [service.submit(**JOB) for _ in range(2)]
    faults: list[tuple[str, str, float]] = []  # (fault, job, seconds until it was dealt with)

    def fence_moves_on(job_id: str) -> Callable[[], bool]:
        fence = store._read(job_id).fence
        return lambda: store._read(job_id).fence > fence

    # 1. SIGKILL a worker in the middle of a job, and start another.
    job, pid = poll(
        "a job past its first checkpoint", lambda: running_on(service, jobs, set(workers)), 60
    )
    taken_over = fence_moves_on(job)
    service.signal_worker(workers.pop(pid), signal.SIGKILL)
    t0 = time.monotonic()
    replacement = service.start_worker()
    workers[replacement.pid] = replacement
    poll("the killed worker's job claimed again", taken_over, 60, service)
    faults.append(("SIGKILL worker mid-job, start another", job, time.monotonic() - t0))

    # 2. SIGSTOP a worker past its lease; resume it once its job was taken over.
    fresh = [service.submit(**JOB) for _ in range(2)]
    jobs += fresh
    job, pid = poll("a second running job", lambda: running_on(service, fresh, set(workers)), 60)
    paused, taken_over = job, fence_moves_on(job)
    workers[pid].send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    service.signalled.add(pid)
    poll("the paused worker's job taken over", taken_over, 60, service)
    faults.append(("SIGSTOP worker past its lease, SIGCONT", job, time.monotonic() - t0))
    workers[pid].send_signal(signal.SIGCONT)

    # 3. Restart Redis (AOF) while jobs run; then SIGKILL a worker: its job waits one lease
    # past the restart (the grace every holder gets), then is taken over.
    fresh = [service.submit(**JOB) for _ in range(2)]
    jobs += fresh
    job, pid = poll("a third running job", lambda: running_on(service, fresh, set(workers)), 60)
    faults.append(("restart Redis (AOF) while jobs run", "all", server.restart()))
    taken_over = fence_moves_on(job)
    service.signal_worker(workers.pop(pid), signal.SIGKILL)
    t0 = time.monotonic()
    replacement = service.start_worker()
    workers[replacement.pid] = replacement
    poll("the second killed worker's job claimed again", taken_over, 60, service)
    faults.append(("SIGKILL a worker just after", job, time.monotonic() - t0))

    # 4. A claim fails: the entry is unreadable when a worker takes the message.
    record = store.create(JOB)
    key = f"{service.settings.redis_prefix}job:{record.job_id}"
    entry = store.client.get(key)
    store.client.set(key, "not an entry")
    create_celery_app(service.settings).send_task(
        TRAIN_TASK, args=[record.job_id], queue=service.settings.queue
    )
    poll("the failed claim", lambda: "cannot claim it" in service.log_text(), 60, service)
    store.client.set(key, entry)  # readable again; its message is gone
    store.mark_enqueued(record.job_id)  # as `send_training` did: only the resend recovers it
    t0 = time.monotonic()
    jobs.append(record.job_id)
    poll("the job claimed after all", lambda: store.get(record.job_id).attempts > 0, 60, service)
    faults.append(("claim raises, message lost", record.job_id, time.monotonic() - t0))

    # 5. Cancel a running job.
    cancelled = service.submit(**JOB)
    jobs.append(cancelled)
    poll("a start", lambda: store.get(cancelled).status == "running", 60, service)
    store.request_cancel(cancelled)
    t0 = time.monotonic()
    poll("the cancel", lambda: store.get(cancelled).finished, 60, service)
    faults.append(("cancel a running job", cancelled, time.monotonic() - t0))

    def all_finished() -> list[JobRecord] | None:
        records = [store.get(job_id) for job_id in jobs]
        return records if all(r.finished for r in records) else None

    records = poll("every job to finish", all_finished, timeout=150)
    elapsed = time.monotonic() - started
    paused_log = service.log_text()

    # Every job in exactly one terminal state; nothing queued or running.
    assert store.counts().get("queued", 0) == store.counts().get("running", 0) == 0
    assert store.page(limit=100, status="queued")[0] == []
    assert store.page(limit=100, status="running")[0] == []
    by_id = {r.job_id: r for r in records}
    assert by_id[cancelled].status == "cancelled"
    for record in records:
        folder = service.settings.models_dir / record.job_id
        if record.status == "succeeded":
            assert load_checkpoint(folder / "model.safetensors").state.epoch == JOB["epochs"]
            assert (folder / "model.json").exists()
        else:
            assert record.status == "cancelled", record
            assert not (folder / "model.json").exists()
            assert record.model_id is None
    assert sum(r.status == "succeeded" for r in records) == len(jobs) - 1

    # Every file was written by the lease holder: no write under a fence once a later
    # fence of the same job has claimed it.
    latest: dict[str, int] = {}
    for _, kind, job_id, fence in fenced_events(service.log_dir):
        if kind == "claim":
            latest[job_id] = max(latest.get(job_id, 0), fence)
        else:
            assert fence == latest.get(job_id), f"stale write by fence {fence} of {job_id}"
    assert f"job {paused}: lease lost; stopping, writing nothing more" in paused_log
    assert sum(r.attempts for r in records) == len(jobs) + 3  # the kills and the pause only

    with capsys.disabled():
        print(f"\nfault injection: {len(jobs)} jobs, 3 workers, {elapsed:.0f} s")
        print(f"{'fault':<40} {'job':<9} {'handled in':>10}  {'outcome':<10} attempts")
        for fault, job_id, seconds in faults:
            record = by_id.get(job_id)
            outcome = f"{record.status:<10} {record.attempts}" if record else "-"
            print(f"{fault:<40} {job_id[:8]:<9} {seconds:>9.1f}s  {outcome}")
        succeeded = sum(r.status == "succeeded" for r in records)
        print(f"all {len(jobs)} jobs: {succeeded} succeeded, 1 cancelled, none failed or stuck")


@pytest.fixture
def quick_resend(tmp_path: Path) -> Iterator[Service]:
    """The test Redis, with messages due again 0.5 s after they were sent."""
    yield from distributed_service(tmp_path, resend_queued_s=0.5)


@pytest.fixture
def short_stall(tmp_path: Path) -> Iterator[Service]:
    """The test Redis, with a 15 s stall (loading MNIST on a busy machine reports no
    progress either)."""
    yield from distributed_service(tmp_path, job_stall_s=15.0)


def test_jobs_waiting_behind_a_busy_worker_are_not_sent_again(
    quick_resend: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five jobs wait while the only worker trains a long one; the reaper finds their
    messages due on every pass (resend after 0.5 s, a pass a second), yet the queue holds
    one message per waiting job: they are still there, so none is lost."""
    service = quick_resend
    settings, store = service.settings, service.store
    busy = service.submit(**{**JOB, "epochs": 10_000})
    service.start_worker()
    service.wait_for(busy, lambda r: r.status == "running", 60, "the long job to start")
    waiting = [service.submit(**JOB) for _ in range(5)]
    queue = f"{settings.redis_prefix}{settings.queue}"
    lengths = []
    passes_end = time.monotonic() + 8 * settings.reaper_interval_s
    while time.monotonic() < passes_end:
        lengths.append(store.client.llen(queue))
        time.sleep(0.05)
    assert [store.get(job_id).status for job_id in waiting] == ["queued"] * 5
    assert store.get(busy).status == "running"
    assert max(lengths) <= len(waiting), max(lengths)
    assert "sending its message again" not in service.log_text()
    for job_id in [busy, *waiting]:
        store.request_cancel(job_id)
    with capsys.disabled():
        print(
            f"\n{len(waiting)} jobs waiting through 8 reaper passes (resend 0.5 s): queue "
            f"length {min(lengths)}-{max(lengths)} over {len(lengths)} readings"
        )


def test_a_worker_whose_training_hangs_exits_and_its_job_resumes_elsewhere(
    short_stall: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """The job's checkpoint is a FIFO with no writer: resuming from it blocks in open(2)
    for good, as on a hung NFS mount. Its watchdog ends the process once training made no
    progress for `job_stall_s` (15 s) plus a heartbeat; the supervisor (here, the test)
    starts a fresh worker, which takes the job over once its lease expired."""
    service = short_stall
    job_id = service.store.create({**TINY_CONFIG, "epochs": 1}).job_id
    hung = service.settings.models_dir / job_id / "model.safetensors"
    hung.parent.mkdir(parents=True)
    os.mkfifo(hung)
    enqueue_training(job_id, settings=service.settings)
    worker = service.start_worker()
    service.signalled.add(worker.pid)  # its exit is the point
    service.wait_for(job_id, lambda r: r.status == "running", 60, "the claim")
    t0 = time.monotonic()
    exit_code = worker.wait(timeout=60)
    exited_s = time.monotonic() - t0
    assert exit_code == 1, service.logs()
    # safetensors holds the GIL in open(2): the heartbeat thread stopped too, and only
    # faulthandler's C thread could end the process, with every thread's stack.
    assert "Timeout (" in service.log_text()
    assert "in load_checkpoint" in service.log_text()

    hung.unlink()  # the mount is back
    service.start_worker()
    record = service.wait_finished(job_id, timeout=90)
    assert (record.status, record.attempts) == ("succeeded", 2)
    with capsys.disabled():
        print(
            f"\nhung training: worker exited {exited_s:.1f} s after its claim was seen "
            f"(stall 15 s + heartbeat 1 s); job resumed elsewhere, {record.status}"
        )


def pause_outside_writes(worker: subprocess.Popen[bytes], folder: Path) -> None:
    """SIGSTOP `worker` at a moment it holds no lock of the model folder `folder` (paused
    inside a write, it would block every other writer of the folder)."""
    with open(folder / LOCK_NAME, "rb") as lock:
        while True:
            worker.send_signal(signal.SIGSTOP)
            os.waitpid(worker.pid, os.WUNTRACED)  # returns once it is stopped
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                worker.send_signal(signal.SIGCONT)
                time.sleep(0.05)
                continue
            fcntl.flock(lock, fcntl.LOCK_UN)
            return


def test_a_claim_that_redis_lost_gives_two_workers_one_fence_and_the_storage_keeps_one(
    lossy_cluster: tuple[Service, PrivateRedis], capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 20, item 2, end to end. Redis (no AOF) snapshots a queued job; of two workers,
    A claims it under fence 1 and writes a checkpoint; Redis crashes and comes back from the
    snapshot, the claim lost and the job's message in the queue again, so the other worker,
    B, claims the job under fence 1 too. The store now says B holds it: only the storage can
    stop B, at its first write (A wrote that file). A is paused from before the crash until
    B has ended, else A's renewal would find the job queued and A would stop first, and B's
    refusal would not wait on how fast each trains; then A finishes the job."""
    service, server = lossy_cluster
    store = service.store
    job_id = service.submit(**JOB)
    store.client.save()  # the snapshot the crashed Redis comes back from
    workers = {w.pid: w for w in (service.start_worker(), service.start_worker())}
    logs = {w.pid: service.log_dir / f"worker-{i}.log" for i, w in enumerate(service.workers)}
    record = service.wait_for(job_id, lambda r: r.model_id is not None, 60, "a checkpoint")
    a_name = str(record.worker)
    a_pid = int(a_name.rsplit(":", 1)[1])
    (b_pid,) = set(workers) - {a_pid}
    b_name = f"{socket.gethostname()}:{b_pid}"
    a, a_log, b_log = workers[a_pid], logs[a_pid], logs[b_pid]

    folder = service.settings.models_dir / job_id
    pause_outside_writes(a, folder)
    paused = time.monotonic()
    server.crash()
    server.start()
    restarted = time.monotonic()
    poll("B's claim", lambda: store.get(job_id).worker == b_name, 60, service)
    ended = re.compile(rf"job {job_id}: (\w+)$", re.MULTILINE)
    b_outcome = poll("B's attempt to end", lambda: ended.search(b_log.read_text()), 60, service)
    stopped_s = time.monotonic() - restarted
    a.send_signal(signal.SIGCONT)
    paused_s = time.monotonic() - paused
    record = service.wait_finished(job_id, timeout=90)

    for log in (a_log, b_log):
        assert STARTED.findall(log.read_text()) == [(job_id, "1")]  # one claim each, fence 1
    assert b_outcome[1] == "lost", service.logs()
    b_lines = list(log_lines(b_log))
    refused = [at for at, m in b_lines if "may not replace it; stopping, writing nothing more" in m]
    assert len(refused) == 1, service.logs()
    assert not [m for at, m in b_lines if at > refused[0] and WROTE.search(m)]
    assert "lease lost" not in a_log.read_text()
    assert (record.status, record.attempts) == ("succeeded", 1)
    assert load_checkpoint(folder / CHECKPOINT_NAME).state.epoch == JOB["epochs"]
    # Every file of the model was written last by A's attempt, and by no other since.
    writers = json.loads((folder / WRITERS_NAME).read_text())
    files = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert files == set(writers) == {CHECKPOINT_NAME, METRICS_NAME, MODEL_INFO_NAME}
    attempts = {attempt for _, attempt in writers.values()}
    assert len(attempts) == 1 and attempts.pop().startswith(f"{a_name}/"), writers
    assert {fence for fence, _ in writers.values()} == {1}

    b_claimed = next(at for at, m in b_lines if STARTED.search(m))
    with capsys.disabled():
        print(
            f"\nfence handed out twice: B stopped {(refused[0] - b_claimed).total_seconds():.1f} s"
            f" after its claim ({stopped_s:.1f} s after Redis came back), at its first write;"
            f" A paused {paused_s:.1f} s, then {record.status}, {record.attempts} attempt"
        )
