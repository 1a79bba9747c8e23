"""The distributed job store: one Redis string per job, changed by WATCH/MULTI.

Keys, all under the configured prefix `p` (default "iwae:"), in the broker's database:

- `p job:{id}`: the job's `Entry` as JSON. A finished one expires after `retention_s`; a
  study's cell only with its study, `retention_s` after the last cell ended.
- `p jobs`: sorted set of job ids by creation time, for paging (expired ids are dropped
  when a page meets them).
- `p active`: sorted set of the queued and running ids, which the reaper scans and
  `max_active_jobs` bounds, and which `GET /jobs?status=queued|running` walks.
- `p ended:{status}`: sorted set of the ids that ended in `status` (succeeded, failed,
  cancelled) by creation time, so that `GET /jobs?status=` walks those jobs only, never the
  whole history (expired ids are dropped when a page meets them). Filled once from `p jobs`
  for records written before it existed (`p ended:indexed` marks that done).
- `p counts`: hash of jobs by status (finished statuses count every job that ever ended so,
  records since expired included), kept by every change, so `/metrics` reads one key.
- `p study:{id}`: a study (`StudyRecord`) as JSON, written with its jobs in one transaction;
  `p studies`: sorted set of study ids by creation time.

The clock is Redis `TIME`: one clock for the API and every worker, whatever theirs say.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

import redis

from worker.jobs.record import (
    ACTIVE,
    WORKER_RETENTION_S,
    Entry,
    Instant,
    JobNotFound,
    JobRecord,
    JobStatus,
    StudyNotFound,
    StudyRecord,
    WorkerInfo,
)
from worker.jobs.store import Insert, JobStore

T = TypeVar("T")

log = logging.getLogger(__name__)


class RedisJobStore(JobStore):
    """Job store in a Redis database shared by the API and every worker."""

    def __init__(self, client: redis.Redis, *, prefix: str = "iwae:", **limits: float) -> None:
        super().__init__(**limits)  # type: ignore[arg-type]
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "iwae:", **limits: float) -> RedisJobStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
        )
        return cls(client, prefix=prefix, **limits)

    # --- keys ---------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def _active(self) -> str:
        return f"{self.prefix}active"

    @property
    def _counts(self) -> str:
        return f"{self.prefix}counts"

    @property
    def _workers(self) -> str:
        return f"{self.prefix}workers"

    def _ended(self, status: str) -> str:
        return f"{self.prefix}ended:{status}"

    def _index_ended(self) -> None:
        """Fill `p ended:{status}` from the whole history, once per database: the records
        that ended before the per-status sets existed."""
        marker = f"{self.prefix}ended:indexed"
        if self.client.exists(marker):
            return
        cursor = None
        while True:
            records, cursor = self._walk(
                self._index,
                self._job,
                lambda raw: Entry.model_validate_json(raw).record,
                lambda record: record.status not in ACTIVE,
                limit=500,
                cursor=cursor,
            )
            with self.client.pipeline() as pipe:
                for record in records:
                    pipe.zadd(self._ended(record.status), {record.job_id: _created(record)})
                pipe.execute()
            if cursor is None:
                break
        self.client.set(marker, "1")

    def _study(self, study_id: str) -> str:
        return f"{self.prefix}study:{study_id}"

    @property
    def _studies(self) -> str:
        return f"{self.prefix}studies"

    # --- storage ------------------------------------------------------------------------

    def _clock(self, client: redis.Redis | None = None) -> Instant:
        seconds, micros = (client or self.client).time()
        return _instant(seconds + micros / 1e6, self._uptime(client))

    def _uptime(self, client: redis.Redis | None) -> float:
        return float((client or self.client).info("server")["uptime_in_seconds"])

    def _insert(self, make: Callable[[Instant, int], Insert]) -> Insert:
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._active)
                    now = self._clock(pipe)
                    insert = make(now, pipe.zcard(self._active))
                    pipe.multi()
                    if (study := insert.study) is not None:
                        pipe.set(self._study(study.study_id), study.model_dump_json())
                        pipe.zadd(self._studies, {study.study_id: now.t})
                    for entry in insert.entries:
                        job_id, t = entry.record.job_id, entry.record.created_at.timestamp()
                        pipe.set(self._job(job_id), entry.model_dump_json())
                        pipe.zadd(self._index, {job_id: t})
                        pipe.zadd(self._active, {job_id: t})
                        pipe.hincrby(self._counts, entry.record.status, 1)
                    pipe.execute()
                    return insert
                except redis.WatchError:
                    continue

    def _read(self, job_id: str) -> Entry:
        raw = self.client.get(self._job(job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return Entry.model_validate_json(raw)

    def _read_many(self, job_ids: Sequence[str]) -> list[Entry | None]:
        if not job_ids:
            return []
        raws = self.client.mget([self._job(job_id) for job_id in job_ids])
        return [None if raw is None else Entry.model_validate_json(raw) for raw in raws]

    def _read_study(self, study_id: str) -> StudyRecord:
        raw = self.client.get(self._study(study_id))
        if raw is None:
            raise StudyNotFound(study_id)
        return StudyRecord.model_validate_json(raw)

    def _update(self, job_id: str, change: Callable[[Entry, Instant], T]) -> T:
        key = self._job(job_id)
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    entry = Entry.model_validate_json(raw)
                    before = entry.record.status
                    result = change(entry, self._clock(pipe))
                    after = entry.model_dump_json()
                    if after == raw:
                        return result
                    pipe.multi()
                    pipe.set(key, after)
                    status = entry.record.status
                    ended = status != before and status not in ACTIVE
                    if status != before:
                        pipe.hincrby(self._counts, before, -1)
                        pipe.hincrby(self._counts, status, 1)
                    if ended:
                        pipe.zrem(self._active, job_id)
                        pipe.zadd(self._ended(status), {job_id: _created(entry.record)})
                        if self.retention_s is not None and entry.record.study_id is None:
                            pipe.expire(key, self._retention)
                    pipe.execute()
                    if ended and entry.record.study_id is not None:
                        self._expire_if_ended(entry.record.study_id)
                    return result
                except redis.WatchError:
                    continue

    @property
    def _retention(self) -> int:
        return max(1, round(self.retention_s or 0))

    def _expire_if_ended(self, study_id: str) -> None:
        """Once every cell of the study has ended, start the retention of the study and of
        its cells' records together. Called after each cell ends: the last one to end sees
        them all ended. If it fails, the study and its jobs are kept (never half of them).
        """
        if self.retention_s is None:
            return
        try:
            view = self.study(study_id)
            if view.ended_at is None:
                return
            with self.client.pipeline() as pipe:
                pipe.expire(self._study(study_id), self._retention)
                for cell in view.study.cells:
                    pipe.expire(self._job(cell.job_id), self._retention)
                pipe.execute()
        except (redis.RedisError, StudyNotFound):
            log.warning("study %s: its retention not started", study_id, exc_info=True)

    def _active_ids(self) -> list[str]:
        return list(self.client.zrange(self._active, 0, -1))

    def _page(
        self, *, limit: int, cursor: str | None, status: JobStatus | None
    ) -> tuple[list[JobRecord], str | None]:
        index = self._index
        if status in ACTIVE:
            index = self._active
        elif status is not None:
            self._index_ended()
            index = self._ended(status)
        return self._walk(
            index,
            self._job,
            lambda raw: Entry.model_validate_json(raw).record,
            lambda record: status in (None, record.status),
            limit=limit,
            cursor=cursor,
        )

    def study_page(
        self, *, limit: int, cursor: str | None = None
    ) -> tuple[list[StudyRecord], str | None]:
        return self._walk(
            self._studies,
            self._study,
            StudyRecord.model_validate_json,
            lambda _: True,
            limit=limit,
            cursor=cursor,
        )

    def _walk(
        self,
        index: str,
        key: Callable[[str], str],
        parse: Callable[[str], T],
        keep: Callable[[T], bool],
        *,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[T], str | None]:
        """Up to `limit` kept items of the sorted set `index` (ids by creation time, each
        stored at `key(id)`), newest first, below the score `cursor`; and the next cursor.
        """
        top = f"({cursor}" if cursor is not None else "+inf"
        items: list[T] = []
        while len(items) < limit:
            rows = self.client.zrevrangebyscore(
                index, top, "-inf", start=0, num=limit, withscores=True
            )
            if not rows:
                return items, None
            raws = self.client.mget([key(item_id) for item_id, _ in rows])
            for (item_id, score), raw in zip(rows, raws, strict=True):
                top = f"({score!r}"
                if raw is None:  # expired (retention): forget it
                    self.client.zrem(index, item_id)
                    continue
                item = parse(raw)
                if keep(item):
                    items.append(item)
                    if len(items) == limit:
                        break
        more = self.client.zcount(index, "-inf", top) > 0
        return items, (top[1:] if more else None)

    def counts(self) -> dict[str, int]:
        return {status: int(n) for status, n in self.client.hgetall(self._counts).items()}

    def report_worker(self, name: str, queues: list[str], outcome: str | None = None) -> None:
        self._update_worker(name, queues, outcome)

    def _update_worker(self, name: str, queues: list[str], outcome: str | None) -> None:
        with self.client.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self._workers)
                    everyone = pipe.hgetall(self._workers)
                    seconds, micros = pipe.time()
                    now = seconds + micros / 1e6
                    raw = everyone.pop(name, None)
                    data = json.loads(raw) if raw else {"outcomes": {}}
                    data.update(queues=queues, seen=now)
                    if outcome is not None:
                        data["outcomes"][outcome] = data["outcomes"].get(outcome, 0) + 1
                    gone = [
                        other
                        for other, info in everyone.items()
                        if json.loads(info)["seen"] < now - WORKER_RETENTION_S
                    ]
                    pipe.multi()
                    pipe.hset(self._workers, name, json.dumps(data))
                    if gone:
                        pipe.hdel(self._workers, *gone)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def workers(self) -> list[WorkerInfo]:
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        infos = []
        for name, raw in self.client.hgetall(self._workers).items():
            data = json.loads(raw)
            infos.append(
                WorkerInfo(
                    name=name,
                    queues=data["queues"],
                    seen_s_ago=max(0.0, now - data["seen"]),
                    outcomes=data["outcomes"],
                )
            )
        return sorted(infos, key=lambda w: w.seen_s_ago)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        self.client.close()


def _created(record: JobRecord) -> float:
    """A job's score in the sorted sets: its creation time."""
    return record.created_at.timestamp()


def _instant(t: float, up_s: float) -> Instant:
    return Instant(t=t, wall=datetime.fromtimestamp(t, UTC), up_s=up_s)
