"""The statuses of a run (a training job, a study's cell) and of a study, listed once.

The job store (`worker.jobs.record`), a study's results (`models.study.results`) and the
API's schemas import them from here, the lowest layer that needs them.
"""

from __future__ import annotations

from typing import Literal, get_args

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATUSES: tuple[JobStatus, ...] = get_args(JobStatus)
# How a run ends.
Outcome = Literal["succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset(get_args(Outcome))
# A study's status, from its cells' (`models.study.results.study_status`).
StudyStatus = Literal["queued", "running", "succeeded", "partial", "failed", "cancelled"]
STUDY_STATUSES: tuple[StudyStatus, ...] = get_args(StudyStatus)
