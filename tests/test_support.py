"""The test helpers that guard the suite itself: a hung command fails its test quickly and says where it
waited, instead of holding a CI worker until the job's limit."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from support import run_command

# a parent that starts a child (as mrl-train starts its DDP ranks) and both wait forever
HANGS = """
import subprocess, sys, time
CHILD = "import time\\ndef waiting_child():\\n    time.sleep(600)\\nwaiting_child()"
child = subprocess.Popen([sys.executable, "-c", CHILD])
open("child.pid", "w").write(str(child.pid))
def waiting_parent():
    time.sleep(600)
waiting_parent()
"""


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
    except FileNotFoundError:
        return False
    return "zombie" not in state


def test_a_hung_command_fails_with_every_process_stack_and_leaves_none_running(tmp_path):
    (tmp_path / "hangs.py").write_text(HANGS)
    started = time.monotonic()
    with pytest.raises(AssertionError) as failed:
        run_command("python", "hangs.py", cwd=tmp_path, timeout=5)
    assert time.monotonic() - started < 60
    message = str(failed.value)
    assert "ran past 5 s" in message
    assert "waiting_parent" in message and "waiting_child" in message, message  # both processes' stacks
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child), "the command's child process outlived it"
