"""A model goes on (resume=, ckpt_path=) or is evaluated (mrl-eval) only on the classes it was trained on,
named as they were: data with as many classes under other names is refused, not trained or measured with
mixed-up labels. And resume= takes key=value overrides of the run's own config, as docs/training.md says."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow

IMAGES = ["data.img_size=32", "data.batch_size=8", "data.num_workers=0", "threads=1", "trainer.max_epochs=1"]
OTHER_CLASSES = "trained on other classes than this data has"


@pytest.fixture
def trees(tmp_path):
    """An ImageFolder tree of 3 classes, the same images under 3 other class names, and a copy of the
    first (the same classes in another place)."""
    from mrl.data.generate import write_image_tree

    ours = write_image_tree(tmp_path / "ours", classes=3, per_class={"train": 8, "val": 2}, size=(40, 30))
    renamed = shutil.copytree(ours, tmp_path / "renamed")
    for split in ("train", "val"):
        for label, name in enumerate(("cat", "dog", "eel")):
            (renamed / split / f"class_{label:04d}").rename(renamed / split / name)
    return ours, renamed, shutil.copytree(ours, tmp_path / "moved")


def _snapshot(job):
    return {str(p.relative_to(job)): p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()}


def _assert_refused(result, *expected):
    assert result.returncode != 0
    assert "Traceback" not in result.output, result.output[-3000:]
    for text in expected:
        assert text in result.output, result.output[-3000:]


def test_other_class_names_are_refused_and_the_same_classes_elsewhere_go_on(run_main, trees, tmp_path):
    ours, renamed, moved = trees
    job = tmp_path / "job"
    trained = run_main(
        "mrl-train", "data=imagefolder", f"data.root={ours}", *IMAGES, "logger=none", f"hydra.run.dir={job}"
    )
    assert trained.returncode == 0, trained.output[-3000:]
    before = _snapshot(job)
    label0 = "label 0: 'class_0000' in the checkpoint, 'cat' in this data"

    # resume=, with the data's key as the run's config has it, or added (+): refused, nothing changed
    for override in (f"+data.root={renamed}", f"data.root={renamed}"):
        _assert_refused(
            run_main("mrl-train", f"resume={job}", override, "trainer.max_epochs=2"), OTHER_CLASSES, label0
        )
    # a new run from the checkpoint, and mrl-eval on the other data
    ckpt = job / "checkpoints" / "last.ckpt"
    finetune = ["data=imagefolder", f"data.root={renamed}", *IMAGES, "logger=none", f"ckpt_path={ckpt}"]
    _assert_refused(run_main("mrl-train", *finetune), OTHER_CLASSES)
    evaluated = run_main("mrl-eval", f"ckpt_path={ckpt}", f"+data.root={renamed}", "logger=none")
    _assert_refused(evaluated, OTHER_CLASSES)
    assert not list(tmp_path.rglob("report.json"))
    changed = {k for k in set(before) | set(_snapshot(job)) if before.get(k) != _snapshot(job).get(k)}
    assert {k for k in changed if not k.startswith(".hydra/resume") and not k.endswith(".log")} == set()

    # the same classes in another place: resume= takes the run's own data key (Hydra's defaults lack it)
    resumed = run_main("mrl-train", f"resume={job}", f"data.root={moved}", "trainer.max_epochs=2")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"root: {moved}" in (job / "resolved_config.yaml").read_text()


def test_resume_judges_overrides_against_the_runs_own_config(run_main, tmp_path):
    from support import TINY

    job = tmp_path / "job"
    assert run_main("mrl-train", *TINY, "logger=none", f"hydra.run.dir={job}").returncode == 0
    config = (job / "resolved_config.yaml").read_bytes()
    typo = run_main("mrl-train", f"resume={job}", "trainr.max_epochs=2")
    _assert_refused(typo, "has no trainr.max_epochs", "Check the spelling")
    _assert_refused(run_main("mrl-train", f"resume={job}", "debug=tiny"), "changes a whole config group")
    _assert_refused(run_main("mrl-train", f"resume={job}", "head.nesting=[4,8"), "cannot read the overrides")
    assert (job / "resolved_config.yaml").read_bytes() == config
    # a key of the run's data set (synthetic) that the default one (Fashion-MNIST) does not have
    more = run_main("mrl-train", f"resume={job}", "data.train_size=192", "trainer.max_epochs=2")
    assert more.returncode == 0, more.output[-3000:]
    assert "train_size: 192" in (job / "resolved_config.yaml").read_text()
    # fewer epochs than the run has trained: Lightning's traceback before
    back = run_main("mrl-train", f"resume={job}", "trainer.max_epochs=1")
    _assert_refused(back, "trainer.max_epochs=1", "has trained 2 epochs", "trainer.max_epochs=3 or more")
