"""The package as users get it: a wheel that carries its configs, installs with our constraints into a
new environment and trains from anywhere, and never replaces the user's own torch.

The new environments see this venv's packages through a ``.pth`` file instead of downloading them again
(no network in CI); what they install themselves is the wheel alone, resolved by pip against them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("mrl-*.whl")
    return path


def new_env(root: Path, fake: dict[str, tuple[str, str]] | None = None) -> Path:
    """A fresh venv that sees this venv's packages (after its own); ``fake`` pretends other versions of
    some distributions are installed in it: name -> (version, Requires-Dist or "")."""
    # without its own pip and setuptools, which would shadow (older) the shared venv's
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, capture_output=True
    )
    python = root / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "zz_shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    for name, (version, requires) in (fake or {}).items():
        info = site / f"{name}-{version}.dist-info"
        info.mkdir()
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        (info / "METADATA").write_text(meta + (f"Requires-Dist: {requires}\n" if requires else ""))
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return python


def pip_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "install", "--no-index", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_wheel_requires_ranges_not_pins(wheel):
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [
        line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")
    ]
    pinned = [r for r in requires if "==" in r.split(";")[0]]
    assert not pinned, f"package requirements must be ranges (pins belong in constraints.txt): {pinned}"
    assert any(r.startswith("torch>=") for r in requires)
    assert any(r.startswith("litdata") and "extra == 'shards'" in r.replace('"', "'") for r in requires)


def test_installing_mrl_keeps_the_users_torch(wheel, tmp_path):
    """A user's environment with another supported torch (the GPU machine's 2.11 CUDA build, say):
    pip's resolver installs mrl alone and keeps their torch and torchvision."""
    python = new_env(
        tmp_path / "user",
        fake={"torch": ("2.11.0", ""), "torchvision": ("0.26.0", "torch==2.11.0")},
    )
    report = tmp_path / "report.json"
    result = pip_install(python, "--dry-run", "--report", str(report), f"{wheel}[shards]")
    assert result.returncode == 0, result.stderr[-3000:]
    installs = {
        i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(report.read_text())["install"]
    }
    assert installs == {"mrl": "0.1.0"}, installs


def test_wheel_installs_with_the_constraints_and_trains_outside_the_checkout(wheel, tmp_path):
    python = new_env(tmp_path / "env")
    result = pip_install(python, "-c", str(REPO / "constraints.txt"), f"{wheel}[shards]")
    assert result.returncode == 0, result.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MRL_LOG_DIR")}
    code = "import mrl.config_path as c; print(c.config_dir())"
    where = subprocess.run([str(python), "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert where.stdout.strip().startswith(str(tmp_path / "env")), where.stdout + where.stderr
    job = subprocess.run(
        [str(python.parent / "mrl-train"), "experiment=smoke", "threads=2"],
        cwd=work,
        env={**env, "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    (results,) = (work / "logs" / "train" / "runs").glob("*/results.json")
    assert any(k.startswith("test/acc@") for k in json.loads(results.read_text()))
