"""The test helpers that guard the suite itself: a hung command fails its test quickly and says where it
waited, instead of holding a CI worker until the job's limit; what a child process sends back survives
the child."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from support import received_from_children, run_command, send_to_parent

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


def _send_a_tensor(out) -> None:
    import torch

    send_to_parent(out, "rank0", torch.arange(6.0).reshape(2, 3))


def test_a_tensor_a_child_sent_is_read_after_the_child_has_exited():
    # torch's queue pickler would hand the parent a file descriptor to fetch from the child's socket,
    # gone once the child exits: the parent reads only after the join to make that race certain
    import torch
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    out = context.Queue()
    child = context.Process(target=_send_a_tensor, args=(out,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    got = received_from_children(out, 1, timeout=10)
    assert torch.equal(got["rank0"], torch.arange(6.0).reshape(2, 3))
