"""A job's files in the model storage, written under the fence of its claim.

The training pipeline writes the job's files (the checkpoint at every epoch end,
`metrics.json`, then `model.json`) through `JobFiles.write`: first the lease check
(`LeaseKeeper.fence`: the lease surely holds, else renew or raise `LeaseLost`), then the
storage's fenced write under this attempt's `Writer`, the fence of the claim and an id of
this attempt. The storage refuses it (`StaleWrite`) when a newer fence, or another attempt
under the same fence, wrote that file last (`models.storage.base`): so even a job store that
lost writes and handed one fence to two workers cannot make them overwrite each other; the
second to write stops.

With a file store the pipeline runs in the model's folder itself. With an object store it
runs in this worker's `IWAE_HOME/models/{job_id}/`, into which `prepare()` downloads the
job's last checkpoint, so that a job resumes on whichever machine takes it.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from models.files import write_atomic
from models.storage import Storage, Writer
from models.storage.layout import CHECKPOINT_NAME, MODEL_INFO_NAME, model_key
from worker.jobs import worker_name


class JobFiles:
    """The files of the job `job_id` as the attempt holding `fence` writes them.

    `check(path)` is the lease check made before every write and delete; `work_dir` is the
    local folder the pipeline runs in when the storage is not a local folder.
    """

    def __init__(
        self,
        storage: Storage,
        job_id: str,
        fence: int,
        check: Callable[[Path], None],
        work_dir: Path,
    ) -> None:
        self.storage = storage
        self.job_id = job_id
        self.check = check
        self.work_dir = work_dir
        self.writer = Writer(fence, f"{worker_name()}/{uuid.uuid4().hex[:12]}")
        self.has_checkpoint = False

    def prepare(self) -> Path:
        """The folder the pipeline runs in, holding the job's last checkpoint if any."""
        key = model_key(self.job_id, CHECKPOINT_NAME)
        local = self.storage.local_path(key)
        if local is not None:
            self.has_checkpoint = local.is_file()
            return local.parent
        data = self.storage.get(key)
        checkpoint = self.work_dir / CHECKPOINT_NAME
        if data is None:
            checkpoint.unlink(missing_ok=True)  # a download of an attempt that was undone
        else:
            write_atomic(checkpoint, data)
            self.has_checkpoint = True
        return self.work_dir

    def cleanup(self) -> None:
        """Remove the downloaded checkpoint (the store keeps the job's files)."""
        if self.storage.local_path(model_key(self.job_id, CHECKPOINT_NAME)) is None:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def write(self, path: Path, data: bytes) -> None:
        """Store `data` as the job's file `path.name` (a `models.files.Write`)."""
        self.check(path)
        self.storage.put(model_key(self.job_id, path.name), data, self.writer)
        if path.name == CHECKPOINT_NAME:
            self.has_checkpoint = True

    def discard(self) -> None:
        """Delete the files of a job that did not succeed: `model.json` first (left by an
        earlier attempt whose finish was not recorded), so that no model of it is served,
        then its checkpoint and the rest, which nothing will resume or serve."""
        keys = _job_keys(self.storage, self.job_id)
        if keys:
            self.check(Path(MODEL_INFO_NAME))
        for key in keys:
            self.storage.delete(key, self.writer)


def discard_model(storage: Storage, job_id: str) -> None:
    """Delete the files of a job settled without its worker (cancelled, or failed after
    its worker was lost too often): no model is listed for it, and its checkpoint no longer
    takes space for good."""
    for key in _job_keys(storage, job_id):
        storage.delete(key)


def _job_keys(storage: Storage, job_id: str) -> list[str]:
    """The keys of the job's files, `model.json` first (unlisted before anything else)."""
    info = model_key(job_id, MODEL_INFO_NAME)
    keys = [o.key for o in storage.list(model_key(job_id, ""))]
    # The listing already says whether model.json is there: no second request for it.
    return [info, *(key for key in keys if key != info)] if info in keys else keys
