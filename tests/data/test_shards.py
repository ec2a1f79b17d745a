"""Shards: mrl-prepare-data writes them, data=shards reads them (one process, DDP, killed and resumed)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from litdata import StreamingDataset
from PIL import Image

from mrl.data.decode import decode_rgb
from mrl.data.encoded import split_encoded
from mrl.data.generate import make_jpeg
from mrl.data.prepare import prepare_shards
from mrl.data.shards import METADATA_NAME, ShardDataModule
from mrl.errors import MRLError
from support import read_results, recorded_ranks, saved_weights_val_accuracy, shard_args

RESNET_CONFIG = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def tree_items(tree: Path, split: str) -> list[tuple[str, int]]:
    classes = sorted(p.name for p in (tree / "train").iterdir())
    return sorted(
        (digest(f.read_bytes()), classes.index(f.parent.name)) for f in (tree / split).glob("*/*.jpg")
    )


def stored_items(shards: Path, split: str) -> list[tuple[bytes, int]]:
    dataset = StreamingDataset(str(shards / split))
    return [(item["image"], int(item["label"])) for item in (dataset[i] for i in range(len(dataset)))]


def datamodule(shards: Path | str, **kwargs) -> ShardDataModule:
    dm = ShardDataModule(str(shards), img_size=32, batch_size=8, eval_batch_size=8, num_workers=0, **kwargs)
    dm.configure_transforms(RESNET_CONFIG)
    dm.setup()
    return dm


def training(dm: ShardDataModule, step: int = 0) -> None:
    """A stand-in trainer in its training loop (what the crop and flip read off the trainer)."""
    dm.trainer = SimpleNamespace(
        training=True, current_epoch=0, global_step=step, global_rank=0, num_devices=1
    )


def test_prepare_stores_every_image_once_with_trains_labels(tiny_image_tree, tiny_shards):
    meta = json.loads((tiny_shards / METADATA_NAME).read_text())
    assert meta["classes"] == [f"class_{i:04d}" for i in range(4)]
    assert meta["splits"] == {"train": 96, "val": 16}
    assert not (tiny_shards / "test").exists()
    for split in ("train", "val"):
        stored = stored_items(tiny_shards, split)
        # small RGB JPEGs are stored byte for byte
        assert sorted((digest(data), label) for data, label in stored) == tree_items(tiny_image_tree, split)
    # several chunks, and the file order was shuffled before writing: chunks mix classes
    chunks = json.loads((tiny_shards / "train" / "index.json").read_text())["chunks"]
    assert len(chunks) > 2
    first_chunk = [label for _, label in stored_items(tiny_shards, "train")[: chunks[0]["chunk_size"]]]
    assert len(set(first_chunk)) > 1


def test_max_side_shrinks_and_other_formats_become_jpeg(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        (tree / split / "cat").mkdir(parents=True)
        (tree / split / "cat" / "big.jpg").write_bytes(make_jpeg(0, 0, (120, 90), 90, 0))
        Image.new("RGBA", (30, 50), (10, 20, 30, 255)).save(tree / split / "cat" / "small.png")
    out = prepare_shards(str(tree), str(tmp_path / "out"), max_side=64, num_workers=1)
    shapes = []
    for data, _ in stored_items(out, "train"):
        assert Image.open(io.BytesIO(data)).format == "JPEG"
        shapes.append(tuple(decode_rgb(data).shape))
    assert sorted(shapes) == [(3, 48, 64), (3, 50, 30)]


def test_prepare_never_writes_over_existing_data(tiny_image_tree, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MRLError, match="not empty"):
        prepare_shards(str(tiny_image_tree), str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_a_corrupt_image_fails_cleanly_and_leaves_nothing(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        (tree / split / "dog").mkdir(parents=True)
        (tree / split / "dog" / "fine.jpg").write_bytes(make_jpeg(0, 0, (40, 30), 90, 0))
    (tree / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg at all")
    whole = make_jpeg(1, 0, (40, 30), 90, 0)
    (tree / "train" / "dog" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # a valid header
    with pytest.raises(MRLError, match=r"broken\.jpg") as err:
        prepare_shards(str(tree), str(tmp_path / "out"), num_workers=1)
    assert "truncated.jpg" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tree"], "no output and no partial folder"


def test_prepare_refuses_a_tree_without_val(tmp_path):
    (tmp_path / "tree" / "train" / "a").mkdir(parents=True)
    with pytest.raises(MRLError, match="val/"):
        prepare_shards(str(tmp_path / "tree"), str(tmp_path / "out"))


def test_a_folder_without_shards_is_a_clear_error(tmp_path):
    with pytest.raises(MRLError, match=f"holds no {METADATA_NAME}.*mrl-prepare-data"):
        ShardDataModule(str(tmp_path))


def test_evaluation_items_are_the_eval_crops_of_the_stored_images(tiny_shards):
    dm = datamodule(tiny_shards, eval_img_size=40)
    expected = [dm.image_transform(False)(data) for data, _ in stored_items(tiny_shards, "val")]
    got = [image for x, _ in dm.val_dataloader() for image in x]
    assert len(got) == 16 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert got[0].shape == (3, 40, 40) and got[0].dtype == torch.uint8


def test_each_epoch_reads_the_training_split_once_in_a_new_order(tiny_shards):
    dm = datamodule(tiny_shards, decode="gpu")  # batches of encoded bytes: cheap to compare
    loader = dm.train_dataloader()
    epochs = []
    for _ in range(2):
        epochs.append(
            [
                (digest(bytes(data.numpy())), seed)
                for b in loader
                for data, seed in zip(split_encoded(b[0], b[1]), b[3].tolist(), strict=True)
            ]
        )
    all_images = sorted(digest(data) for data, _ in stored_items(tiny_shards, "train"))
    for epoch in epochs:
        assert sorted(d for d, _ in epoch) == all_images
    assert [d for d, _ in epochs[0]] != [d for d, _ in epochs[1]], "the order must change between epochs"
    seeds = [dict(epoch) for epoch in epochs]
    assert all(seeds[0][d] != seeds[1][d] for d in all_images), "crops must be drawn anew each epoch"


def test_gpu_decode_gives_the_same_training_batches_as_worker_decode(tiny_shards):
    """decode=gpu (here on the CPU) runs the transfer hook's batched decode and crop: same pixels."""
    batches = []
    for decode in ("cpu", "gpu"):
        dm = datamodule(tiny_shards, decode=decode)
        training(dm)
        batches.append([dm.model_inputs(batch) for batch in dm.train_dataloader()])
    assert len(batches[0]) == len(batches[1]) == 12
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(*batches, strict=True):
        assert torch.equal(y_cpu, y_gpu) and torch.equal(x_cpu, x_gpu)
        assert x_cpu.dtype == torch.float32 and x_cpu.shape == (8, 3, 32, 32)


def test_a_remote_input_dir_streams_through_the_local_cache(tiny_shards, tmp_path):
    """An object-store URI goes to LitData as it is; LitData's ``local:`` scheme stands in for one here:
    the metadata is downloaded and the chunks are copied into data.cache_dir before they are read."""
    dm = datamodule(f"local:{tiny_shards}", cache_dir=str(tmp_path / "cache"), decode="gpu")
    assert dm.num_classes == 4
    assert sum(len(batch[2]) for batch in dm.train_dataloader()) == 96
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("chunk-*.bin"))
    assert len(cached) == len(json.loads((tiny_shards / "train" / "index.json").read_text())["chunks"])


def test_gpu_decode_refuses_pil_augmentations(tiny_shards):
    with pytest.raises(MRLError, match="decode=cpu"):
        ShardDataModule(str(tiny_shards), decode="gpu", augment={"auto_augment": "rand-m9"})


# ---- the real commands --------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_data_command_then_train(run_cli, run_main, tiny_image_tree, tmp_path):
    out = tmp_path / "imagenet-shards"
    made = run_cli("mrl-prepare-data", f"root={tiny_image_tree}", f"output_dir={out}", "max_side=64")
    assert made.returncode == 0, made.output[-3000:]
    assert f"mrl-train data=shards data.input_dir={out}" in made.output
    again = run_main("mrl-prepare-data", f"root={tiny_image_tree}", f"output_dir={out}")
    assert again.returncode == 1 and "never writes over existing data" in again.stderr
    assert "Traceback" not in again.stderr
    trained = run_cli("mrl-train", *shard_args(out))
    assert trained.returncode == 0, trained.output[-3000:]
    results = read_results(trained.run_dirs()[0])
    assert {"val/acc@64", "test/acc@64", "train/loss"} <= set(results)
    missing = run_main("mrl-train", *shard_args(tmp_path / "nowhere"))
    assert (
        missing.returncode == 1 and "mrl-prepare-data" in missing.stderr and "Traceback" not in missing.stderr
    )


@pytest.mark.slow
def test_killed_shard_run_resumes_mid_epoch_with_the_metrics_of_an_uninterrupted_run(
    run_cli, tiny_shards, tmp_path
):
    """kill -9 after a mid-epoch checkpoint, resume=: LitData's loader position (two workers) comes back
    from Lightning's checkpoint, so the resumed run trains on exactly the remaining batches."""
    from support import comparable, kill_run, start, wait_until_stopped

    args = [*shard_args(tiny_shards), "checkpoint_every_n_steps=4"]
    reference = run_cli("mrl-train", *args, "hydra.run.dir=ref")
    assert reference.returncode == 0, reference.output[-3000:]
    expected = read_results(tmp_path / "ref")

    run_dir = tmp_path / "crashed"
    # stops itself at step 6 of the first epoch (12 steps), its checkpoint of step 4 written; killed there
    run = start(tmp_path, *args, f"hydra.run.dir={run_dir}", stop_at="6")
    try:
        wait_until_stopped(run)
    finally:
        kill_run(run)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4, saved["global_step"]
    assert "combined_loader" in saved["loops"]["fit_loop"]["state_dict"], "the loader position was not saved"
    assert not (run_dir / "results.json").exists()

    resumed = run_cli("mrl-train", f"resume={run_dir}")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert comparable(read_results(run_dir)) == pytest.approx(comparable(expected), abs=1e-6)


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_parts_of_each_epoch(run_cli, tiny_shards, tmp_path):
    seen = tmp_path / "seen"
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = run_cli(
        "mrl-train",
        *shard_args(tiny_shards, workers=1),
        "trainer=ddp_cpu",
        "+data.augment.hflip=0",  # no flip: the same sample in the same epoch is the same image
        "+callbacks.record._target_=batch_recorder.BatchRecorder",
        f"+callbacks.record.path={seen}",
        env=env,
        timeout=240,  # about 20 s; once it hung in CI, so a hang fails soon and shows each rank's stack
    )
    assert result.returncode == 0, result.output[-3000:]
    # evaluation: each validation image exactly once over both ranks, so the metrics are a single
    # process's
    (job,) = result.run_dirs()
    # not mrl-eval: the recorder is no mrl component
    accuracies, images = saved_weights_val_accuracy(job, (2, 8, 64))
    assert images == 16
    results = read_results(job)
    for d, accuracy in accuracies.items():
        assert results[f"val/acc@{d}"] == pytest.approx(accuracy, abs=1e-6), d
    recorded_ranks(seen, world=2, per_rank=48)  # 96 images, 2 ranks, batch 8


@pytest.mark.slow
def test_shards_without_litdata_name_the_extra(run_cli, tmp_path):
    """LitData is the optional `shards` extra: without it, data=shards says what to install."""
    fake = tmp_path / "no_litdata" / "litdata"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named litdata')\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(fake.parent), os.environ.get("PYTHONPATH")]))}
    result = run_cli("mrl-train", "data=shards", f"data.input_dir={tmp_path}", "logger=none", env=env)
    assert result.returncode != 0 and "Traceback" not in result.output
    assert "pip install 'mrl[shards]'" in result.stderr
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_deleted_or_truncated_chunk_is_named_before_training(tiny_shards, tmp_path, damage):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    chunk = sorted((copy / "train").glob("*.bin"))[1]
    if damage == "deleted":
        chunk.unlink()
    else:
        chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(MRLError, match=f"incomplete: {chunk.name} .*Prepare the data again"):
        datamodule(copy)


def test_the_training_split_is_evaluated_in_order_without_augmentation(tiny_shards):
    dm = datamodule(tiny_shards, augment={"hflip": 0.5})
    training(dm)  # even inside training, features and embeddings of the training split are not augmented
    batches = [dm.model_inputs(batch) for batch in dm.evaluation_loader("train")]
    again = [dm.model_inputs(batch) for batch in dm.evaluation_loader("train")]
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(label for _, label in stored_items(tiny_shards, "train"))
    assert len(labels) == 96 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    first = batches[0][0][0]
    _image, label = stored_items(tiny_shards, "train")[0]
    assert label == int(batches[0][1][0])
    assert first.shape[-1] == dm.eval_img_size


@pytest.mark.parametrize(("world_size", "start"), [(1, None), (2, "forkserver")])
def test_distributed_jobs_start_shard_workers_from_the_fork_server(tiny_shards, world_size, start):
    # forked from a DDP process, a new worker could inherit a lock another thread held (docs/data.md)
    dm = ShardDataModule(str(tiny_shards), img_size=32, batch_size=8, eval_batch_size=8, num_workers=2)
    dm.configure_transforms(RESNET_CONFIG)
    dm.setup()
    dm.trainer = SimpleNamespace(world_size=world_size)
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.evaluation_loader("train")):
        context = loader.multiprocessing_context
        assert (context and context.get_start_method()) == start
    items = [len(labels) for _, labels in dm.val_dataloader()]  # its workers start and read the split
    assert sum(items) == len(dm.datasets["val"])
    dm.num_workers = 0
    assert dm.train_dataloader().multiprocessing_context is None  # no workers, nothing to start
