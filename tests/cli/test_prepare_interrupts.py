"""mrl-prepare-data stopped midway (Ctrl-C, SIGTERM, SIGKILL, a full disk): it exits non-zero, removes
its partial output (or the next run does, after SIGKILL), and none of its writer processes outlives it."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from mrl.data.generate import write_image_tree
from mrl.errors import MRLError
from support import BIN, command_env

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# The real command, each image taking 0.2 s longer: a signal sent once the first image is being written
# arrives with seconds of writing left (a flake otherwise, on a fast or a loaded machine). The first
# image creates `started`.
SLOW_COMMAND = """
import os, sys, time
import mrl.data.prepare as prepare
encode = prepare.encode_sample
def slow(item):
    with open(os.environ["MRL_TEST_STARTED"], "a"):
        pass
    time.sleep(0.2)
    return encode(item)
prepare.encode_sample = slow
from mrl.cli.prepare_data import main
sys.argv[0] = "mrl-prepare-data"
main()
"""


def holders(mark: Path) -> list[int]:
    """The processes other than this one that hold ``mark`` open (a process that ended holds nothing)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # ended meanwhile, or not ours to read
            if any(os.readlink(fd) == str(mark) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
    return found


# A process told to stop may take seconds to be gone on a loaded machine (CI runs two test files at once;
# a writer exiting under load held the mark for over 3 s): a leaked writer lives on far beyond this.
GRACE = 20.0


def survivors(mark: Path, grace: float = GRACE) -> list[int]:
    """The processes of the run still alive after ``grace`` seconds (returns as soon as none is)."""
    deadline = time.monotonic() + grace
    while (alive := holders(mark)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture
def mark(tmp_path):
    """A file this test holds open: every process it starts inherits the descriptor (fork copies them,
    a command gets it by pass_fds), so the run's processes are found even after being reparented. Any
    left at the end are killed, so a failure here leaves nothing running into later tests."""
    path = tmp_path / "run.mark"
    fd = os.open(path, os.O_CREAT | os.O_RDONLY)
    os.set_inheritable(fd, True)
    yield path
    for pid in holders(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os.close(fd)


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_image_tree(tmp_path / "tree", classes=2, per_class={"train": 48, "val": 4}, size=(32, 24))


def leftovers(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob(".out.partial-*"))


def test_a_full_disk_is_named_and_no_writer_outlives_it(tree, tmp_path, mark, monkeypatch):
    """LitData terminated its workers when one failed, but not the helper processes they had started:
    those kept the terminal (a `| tee` never returned) and the raw traceback was the message."""
    from litdata.streaming import writer

    from mrl.data.prepare import prepare_shards

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(writer.BinaryWriter, "write_chunk_to_file", full)  # the workers are forked
    with pytest.raises(MRLError) as caught:
        prepare_shards(str(tree), str(tmp_path / "out"), num_workers=2, progress=False)
    assert survivors(mark) == []
    message = str(caught.value)
    assert "No space left on device. Free space on the disk of" in message, message
    assert "choose an output_dir on a disk with room" in message and "Traceback" not in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_writer_killed_midway_fails_the_split_instead_of_shortening_it(tree, tmp_path, mark, monkeypatch):
    """A worker killed (by the out-of-memory killer) after some of its images: LitData carried on and
    merged the others' indexes, so the shards lacked that worker's images without a word."""
    import mrl.data.prepare as prepare

    encode, killed = prepare.encode_sample, tmp_path / "killed"

    def killed_once(item):  # in a worker: the tenth image of the run kills its own process
        with contextlib.suppress(FileExistsError):
            if len(list(tmp_path.glob("seen-*"))) >= 10:
                os.close(os.open(killed, os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
        (tmp_path / f"seen-{uuid.uuid4().hex}").touch()
        return encode(item)

    monkeypatch.setattr(prepare, "encode_sample", killed_once)
    with pytest.raises(MRLError, match=r"a writer worker was killed by SIGKILL .*out-of-memory killer"):
        prepare.prepare_shards(str(tree), str(tmp_path / "out"), num_workers=2, progress=False)
    assert killed.exists() and survivors(mark) == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_sigterm_ends_the_writers_removes_the_partial_output_and_exits_143(run_main, tree, tmp_path, mark):
    """SIGTERM (a scheduler's stop, `kill`) ended the command before it could clean up: its hidden
    partial folder stayed, and the exit code was the only sign."""
    import mrl.data.prepare as prepare

    encode, started = prepare.encode_sample, tmp_path / "started"

    def signal_once(item):  # in a worker: the first image sends the signal, every image is slow
        with contextlib.suppress(FileExistsError):
            os.close(os.open(started, os.O_CREAT | os.O_EXCL))
            os.kill(command, signal.SIGTERM)
        time.sleep(0.2)
        return encode(item)

    def unhandled(signum, frame):  # the command's own handler replaces this one while it runs
        raise AssertionError("SIGTERM reached the test: mrl-prepare-data did not handle it")

    command = os.getpid()
    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(prepare, "encode_sample", signal_once)
            result = run_main("mrl-prepare-data", f"root={tree}", f"output_dir={tmp_path / 'out'}")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.returncode == 143, result.output[-2000:]
    assert "stopped by SIGTERM" in result.stderr and "nothing was written at" in result.stderr
    assert "Traceback" not in result.output
    assert survivors(mark) == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def start_slow(tmp_path: Path, tree: Path, mark: Path) -> tuple[subprocess.Popen, Path]:
    """The slowed command in a session of its own (as a terminal starts it), holding ``mark`` open, its
    output in a file."""
    log = tmp_path / "command.log"
    env = command_env(tmp_path / "logs", {"MRL_TEST_STARTED": str(tmp_path / "started")})
    (held,) = (int(fd.name) for fd in Path("/proc/self/fd").iterdir() if os.path.realpath(fd) == str(mark))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(BIN / "python"), "-c", SLOW_COMMAND, f"root={tree}", f"output_dir={tmp_path / 'out'}"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            pass_fds=(held,),
        )
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc, log


@pytest.mark.slow
def test_ctrl_c_exits_130_removes_the_partial_output_and_ends_every_writer(tree, tmp_path, mark):
    """Ctrl-C (SIGINT to the terminal's process group) ended the command with exit code 0 and no word
    (LitData's handler), leaving a hidden folder of partial shards: `mrl-prepare-data ... && mrl-train`
    went on."""
    proc, log = start_slow(tmp_path, tree, mark)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    output = log.read_text()
    assert "stopped by SIGINT" in output and "nothing was written at" in output, output[-3000:]
    assert "Traceback" not in output
    assert survivors(mark) == []
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_killed_run_leaves_no_writer_and_the_next_run_removes_its_leftovers(run_main, tree, tmp_path, mark):
    """SIGKILL (the out-of-memory killer, `kill -9`) cannot be handled: its writers end with it (a guard
    process sees it gone) and the next run removes the partial folder it left, saying so. Before, the
    folder stayed unmentioned (GBs at ImageNet scale)."""
    proc, log = start_slow(tmp_path, tree, mark)
    os.kill(proc.pid, signal.SIGKILL)  # the command alone, as the out-of-memory killer does
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert survivors(mark) == [], log.read_text()[-3000:]
    (left,) = leftovers(tmp_path)

    again = run_main("mrl-prepare-data", f"root={tree}", f"output_dir={tmp_path / 'out'}")
    assert again.returncode == 0, again.output[-3000:]
    assert f"Removed {left} (" in again.stderr and "that was killed" in again.stderr, again.stderr
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "mrl_shards.json").is_file()
