"""The distributed job store: one Redis hash per job, state changes as Lua scripts.

Keys, all under the configured prefix `p` (default "iwae:"), in the broker's database:

- `p job:{id}`: hash of the record's fields (dicts as JSON, absent values as "") plus
  `lease_token`, the token of the claim that runs it.
- `p lease:{id}`: the lease, a string holding the token, with a TTL of `lease_s`. Redis
  expires it, so no clock of any worker is trusted for the lease.
- `p jobs`: sorted set of job ids by creation time, for listing.
- `p running`: set of running job ids, which the reaper scans.
- `p awaiting`: sorted set of queued job ids whose message may not have been sent, by the
  time they were marked.

Each transition (claim, renew, progress, finish, release, cancel, reap) is one Lua script, so it is
atomic with respect to every other worker and the API.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import redis

from worker.jobs import (
    ClaimRefused,
    JobAlreadyFinished,
    JobNotFound,
    JobRecord,
    JobStore,
    Lease,
    lost_error,
    utcnow,
)

# A running job whose lease key is gone was lost with its worker: cancel it if that was
# asked, fail it when it has used its attempts, else return "requeue". Shared by claim/reap.
_EXPIRED = """
local function expired(job, running, id, now, max_attempts, error)
  if redis.call('HGET', job, 'cancel_requested') == '1' then
    redis.call('HSET', job, 'status', 'cancelled', 'finished_at', now, 'updated_at', now,
               'lease_token', '')
    redis.call('SREM', running, id)
    return 'cancelled'
  end
  local attempts = tonumber(redis.call('HGET', job, 'attempts') or '0')
  if attempts >= tonumber(max_attempts) then
    redis.call('HSET', job, 'status', 'failed', 'error', error, 'finished_at', now,
               'updated_at', now, 'lease_token', '')
    redis.call('SREM', running, id)
    return 'exhausted'
  end
  return 'requeue'
end
"""

# KEYS: job, lease, running, awaiting. ARGV: id, token, worker, lease_ms, now, max, error.
_CLAIM = (
    _EXPIRED
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'running' then
  if redis.call('EXISTS', KEYS[2]) == 1 then return 'running' end
  local outcome = expired(KEYS[1], KEYS[3], ARGV[1], ARGV[5], ARGV[6], ARGV[7])
  if outcome ~= 'requeue' then return outcome end
elseif status ~= 'queued' then
  return 'finished'
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[3], 'lease_token', ARGV[2],
           'started_at', ARGV[5], 'updated_at', ARGV[5], 'progress', '')
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[4])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return 'claimed'
"""
)

# KEYS: job, lease, running, awaiting. ARGV: id, now, max, error, now_epoch.
_REAP = (
    _EXPIRED
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 'gone'
end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'alive' end
local outcome = expired(KEYS[1], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4])
if outcome ~= 'requeue' then return outcome end
redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[2], 'lease_token', '')
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
return 'requeued'
"""
)

_OURS = """
local function ours(job, token)
  return redis.call('HGET', job, 'status') == 'running'
     and redis.call('HGET', job, 'lease_token') == token
end
"""

# KEYS: job, lease. ARGV: token, lease_ms.
_RENEW = (
    _OURS
    + """
if not ours(KEYS[1], ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# KEYS: job. ARGV: token, progress, now, model_id.
_PROGRESS = (
    _OURS
    + """
if not ours(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'progress', ARGV[2], 'updated_at', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'model_id', ARGV[4]) end
return 1
"""
)

# KEYS: job, lease, running. ARGV: token, status, now, metrics, error, model_id, id.
_FINISH = (
    _OURS
    + """
if not ours(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[3], 'updated_at', ARGV[3],
           'lease_token', '')
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'metrics', ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'model_id', ARGV[6]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[7])
return 1
"""
)

# KEYS: job, lease, running, awaiting. ARGV: token, now, id, now_epoch.
_RELEASE = (
    _OURS
    + """
if not ours(KEYS[1], ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[2], 'lease_token', '')
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
return 1
"""
)

# KEYS: job, awaiting. ARGV: id, now.
_CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel_requested', '1',
             'finished_at', ARGV[2], 'updated_at', ARGV[2])
  redis.call('ZREM', KEYS[2], ARGV[1])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[2])
end
return status
"""

_JSON_FIELDS = ("config", "progress", "metrics")


class RedisJobStore(JobStore):
    """Job store in a Redis database shared by the API and every worker."""

    def __init__(
        self, client: redis.Redis, *, prefix: str = "iwae:", lease_s: float, max_attempts: int
    ) -> None:
        super().__init__(lease_s=lease_s, max_attempts=max_attempts)
        self.client = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM)
        self._reap = client.register_script(_REAP)
        self._renew = client.register_script(_RENEW)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "iwae:", lease_s: float, max_attempts: int
    ) -> RedisJobStore:
        """Connects lazily, on the first command. The URL's database number is used."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"the job store needs a Redis broker (redis://host:port/db), got {url!r}"
            )
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
        )
        return cls(client, prefix=prefix, lease_s=lease_s, max_attempts=max_attempts)

    # --- keys ----------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _lease(self, job_id: str) -> str:
        return f"{self.prefix}lease:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def _running(self) -> str:
        return f"{self.prefix}running"

    @property
    def _awaiting(self) -> str:
        return f"{self.prefix}awaiting"

    # --- API side ------------------------------------------------------------------------

    def create(self, config: dict[str, Any]) -> JobRecord:
        now = utcnow()
        record = JobRecord(
            job_id=uuid.uuid4().hex,
            status="queued",
            config=config,
            created_at=now,
            updated_at=now,
        )
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._job(record.job_id), mapping=_to_hash(record))
            pipe.zadd(self._index, {record.job_id: now.timestamp()})
            pipe.zadd(self._awaiting, {record.job_id: time.time()})
            pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord:
        data = self.client.hgetall(self._job(job_id))
        if not data:
            raise JobNotFound(job_id)
        return _from_hash(data)

    def list(self) -> list[JobRecord]:
        ids = self.client.zrevrange(self._index, 0, -1)
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(self._job(job_id))
            rows = pipe.execute()
        return [_from_hash(row) for row in rows if row]

    def request_cancel(self, job_id: str) -> JobRecord:
        status = self._cancel(keys=[self._job(job_id), self._awaiting], args=[job_id, _now()])
        if status == "missing":
            raise JobNotFound(job_id)
        if status in ("succeeded", "failed"):
            raise JobAlreadyFinished(job_id, status)
        return self.get(job_id)

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    # --- worker side ---------------------------------------------------------------------

    def claim(self, job_id: str, worker: str) -> Lease:
        token = uuid.uuid4().hex
        outcome = self._claim(
            keys=[self._job(job_id), self._lease(job_id), self._running, self._awaiting],
            args=[
                job_id,
                token,
                worker,
                _ms(self.lease_s),
                _now(),
                self.max_attempts,
                lost_error(self.max_attempts),
            ],
        )
        if outcome == "missing":
            raise JobNotFound(job_id)
        if outcome != "claimed":
            raise ClaimRefused(job_id, outcome)
        return Lease(job_id=job_id, token=token, record=self.get(job_id))

    def renew(self, lease: Lease) -> bool:
        keys = [self._job(lease.job_id), self._lease(lease.job_id)]
        return bool(self._renew(keys=keys, args=[lease.token, _ms(self.lease_s)]))

    def update_progress(
        self, lease: Lease, progress: dict[str, Any], *, model_id: str | None = None
    ) -> bool:
        args = [lease.token, json.dumps(progress), _now(), model_id or ""]
        return bool(self._progress(keys=[self._job(lease.job_id)], args=args))

    def cancel_requested(self, job_id: str) -> bool:
        return self.client.hget(self._job(job_id), "cancel_requested") == "1"

    def finish(
        self,
        lease: Lease,
        status: Literal["succeeded", "failed", "cancelled"],
        *,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
        model_id: str | None = None,
    ) -> bool:
        keys = [self._job(lease.job_id), self._lease(lease.job_id), self._running]
        args = [
            lease.token,
            status,
            _now(),
            "" if metrics is None else json.dumps(metrics),
            error or "",
            model_id or "",
            lease.job_id,
        ]
        return bool(self._finish(keys=keys, args=args))

    def release(self, lease: Lease) -> bool:
        keys = [
            self._job(lease.job_id),
            self._lease(lease.job_id),
            self._running,
            self._awaiting,
        ]
        args = [lease.token, _now(), lease.job_id, time.time()]
        return bool(self._release(keys=keys, args=args))

    def reap(self) -> list[str]:
        requeued = []
        error = lost_error(self.max_attempts)
        for job_id in sorted(self.client.smembers(self._running)):
            outcome = self._reap(
                keys=[self._job(job_id), self._lease(job_id), self._running, self._awaiting],
                args=[job_id, _now(), self.max_attempts, error, time.time()],
            )
            if outcome == "requeued":
                requeued.append(job_id)
        return requeued

    def awaiting_message(self, older_than_s: float = 0.0) -> list[str]:
        ids = self.client.zrangebyscore(self._awaiting, "-inf", time.time() - older_than_s)
        queued = []
        for job_id in ids:
            if self.client.hget(self._job(job_id), "status") == "queued":
                queued.append(job_id)
            else:
                self.client.zrem(self._awaiting, job_id)
        return queued

    def mark_enqueued(self, job_id: str) -> None:
        self.client.zrem(self._awaiting, job_id)

    def close(self) -> None:
        self.client.close()


def _now() -> str:
    return utcnow().isoformat()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _to_hash(record: JobRecord) -> dict[str, str]:
    data = record.model_dump(mode="json")
    out: dict[str, str] = {}
    for key, value in data.items():
        if key in _JSON_FIELDS:
            out[key] = "" if value is None else json.dumps(value)
        elif isinstance(value, bool):
            out[key] = "1" if value else "0"
        else:
            out[key] = "" if value is None else str(value)
    out["lease_token"] = ""
    return out


def _from_hash(data: dict[str, str]) -> JobRecord:
    values: dict[str, Any] = {}
    for key in JobRecord.model_fields:
        raw = data.get(key, "")
        if key in _JSON_FIELDS:
            values[key] = json.loads(raw) if raw else None
        elif key == "cancel_requested":
            values[key] = raw == "1"
        elif raw != "":
            values[key] = raw
    return JobRecord.model_validate(values)
