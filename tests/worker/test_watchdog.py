"""The watchdog: a worker whose training hangs ends its process, so its supervisor starts a
fresh one; one whose training progresses keeps running.

Each case runs a `LeaseKeeper` with a real `Watchdog` in a child process (the watchdog ends
the process it runs in), with a 0.5 s stall and a 0.1 s heartbeat.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

CHILD = """
import ctypes, sys, time
from pathlib import Path
from worker.jobs import FileJobStore
from worker.lease import LeaseKeeper, Watchdog
from worker.settings import WorkerSettings

settings = WorkerSettings(
    home=Path(sys.argv[1]), job_lease_s=5, heartbeat_interval_s=0.1, job_stall_s=0.5
)
store = FileJobStore(settings.jobs_dir, lease_s=5, max_attempts=3)
lease = store.claim(store.create({{"k": 1}}).job_id, "child:1")
with LeaseKeeper(store, lease, settings, Watchdog()) as keeper:
{body}
print("ran to the end", flush=True)
"""


def run_child(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    code = CHILD.format(body=textwrap.indent(textwrap.dedent(body), "    "))
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "hang",
    [
        "time.sleep(30)",  # a hung call that lets other threads run (an NFS read, say)
        "ctypes.PyDLL(None).sleep(30)",  # one that holds the GIL: the heartbeat stops too
    ],
)
def test_a_hung_training_step_ends_the_process(tmp_path: Path, hang: str) -> None:
    child = run_child(tmp_path, f"keeper.progressed()\n{hang}")

    assert child.returncode == 1, child
    assert "ran to the end" not in child.stdout
    assert "Timeout (" in child.stderr  # faulthandler's, then every thread's stack:
    assert 'File "<string>", line 15' in child.stderr  # where it hung


def test_training_that_progresses_is_left_alone(tmp_path: Path) -> None:
    child = run_child(
        tmp_path,
        """
        for _ in range(30):  # 3 s, six stalls' worth, a step every 0.1 s
            time.sleep(0.1)
            keeper.progressed()
        """,
    )

    assert child.returncode == 0, child
    assert child.stdout == "ran to the end\n"
