"""Stopping a supervised process also stops what it left behind after a kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from fedllm.federation.launcher import stop_process_tree

# A parent in its own session that starts a long-lived child (as a SuperNode starts
# flwr-clientapp) and prints the child's pid.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def test_orphans_of_a_killed_process_are_stopped_through_its_process_group():
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child_pid = int(parent.stdout.readline())
    child = psutil.Process(child_pid)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    time.sleep(0.2)
    assert child.is_running()  # orphaned, re-parented, still there
    stop_process_tree(parent, grace_s=5)
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
