"""Synthetic images: the loader hands over keys (or uint8), the device renders, items are functions of
(seed, index)."""

from __future__ import annotations

import torch

from mrl.data.synthetic import MEAN, STD, SyntheticDataModule


def datamodule(**kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(num_classes=5, img_size=16, train_size=40, val_size=24, test_size=8, **kwargs)
    dm.setup()
    return dm


def test_loader_hands_over_keys_and_labels_only():
    dm = datamodule(batch_size=8)
    keys, labels = next(iter(dm.val_dataloader()))
    assert keys.shape == labels.shape == (8,) and keys.dtype == torch.long
    x, y = dm.model_inputs((keys, labels))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and torch.equal(y, labels)


def test_an_item_is_the_same_in_any_batch_and_in_memory():
    dm = datamodule(eval_batch_size=24)
    memory = datamodule(eval_batch_size=24, in_memory=True)
    keys, labels = next(iter(dm.val_dataloader()))
    images, labels_in_memory = next(iter(memory.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (24, 3, 16, 16)
    assert torch.equal(labels, labels_in_memory)
    rendered = dm.renderer.render(keys, labels)
    assert torch.equal(rendered, images)
    # one item rendered alone, or in reverse batch order, gives the same pixels
    assert torch.equal(dm.renderer.render(keys[5:6], labels[5:6])[0], rendered[5])
    assert torch.equal(dm.renderer.render(keys.flip(0), labels.flip(0)).flip(0), rendered)
    # a new data module with the same seed makes the same data, another seed other data
    assert torch.equal(datamodule().renderer.render(keys, labels), rendered)
    other = datamodule(seed=1)
    other_keys, _ = next(iter(other.val_dataloader()))
    assert not torch.equal(other_keys, keys)


def test_splits_differ_and_normalised_images_are_prototype_plus_noise():
    dm = datamodule(noise=0.5)
    train_keys = dm.datasets["train"].keys
    val_keys = dm.datasets["val"].keys
    assert not set(train_keys.tolist()) & set(val_keys.tolist())
    keys, labels = dm.datasets["train"].keys, dm.datasets["train"].labels
    x = (dm.renderer.render(keys, labels).float() / 255 - MEAN) / STD
    prototypes = torch.nn.functional.interpolate(
        dm.renderer.prototypes[labels], size=(16, 16), mode="bilinear"
    )
    residual = x - prototypes
    # uniform noise of std 0.5, rounded to grey levels (1 level = 1/32 here), clipped only in the far tails
    assert abs(residual.std().item() - 0.5) < 0.03 and abs(residual.mean().item()) < 0.03
    assert set(labels.tolist()) == set(range(5))


def test_training_batches_are_flipped_on_the_device_and_evaluation_is_not():
    dm = datamodule(noise=0.0)
    keys, labels = dm.datasets["val"].keys[:16], dm.datasets["val"].labels[:16]
    plain, _ = dm.model_inputs((keys, labels))

    class Training:  # what the flip reads off the trainer
        training, current_epoch, global_step, global_rank = True, 0, 0, 0

    dm.trainer = Training()
    flipped, _ = dm.on_after_batch_transfer((keys, labels), 0)
    same = [torch.equal(a, b) for a, b in zip(flipped, plain, strict=True)]
    mirrored = [torch.equal(a, b.flip(-1)) for a, b in zip(flipped, plain, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and any(mirrored) and any(same)
