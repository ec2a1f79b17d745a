"""The non-finite loss guard, under both host-read policies: the CPU's (the loss read as a number) and an
accelerator's (a device flag read only at ``check``)."""

from __future__ import annotations

import pytest
import torch

from mrl.nn import host_reads
from mrl.training.safeguards import NonFiniteGuard


@pytest.fixture(params=[True, False], ids=["cpu_policy", "device_policy"])
def policy(request, monkeypatch):
    monkeypatch.setattr(host_reads, "host_reads_are_free", lambda device: request.param)
    return request.param


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_is_raised_at_the_next_check(policy, bad):
    guard = NonFiniteGuard()
    guard.observe(torch.tensor(1.5, requires_grad=True) * 2)
    guard.check(0)  # finite so far: no error
    guard.observe(torch.tensor(bad))
    guard.observe(torch.tensor(0.5))  # a later finite loss does not clear the flag
    with pytest.raises(FloatingPointError, match="at or before step 7"):
        guard.check(7)


def test_finite_losses_never_raise(policy):
    guard = NonFiniteGuard()
    for value in (0.0, 1e30, -3.0):
        guard.observe(torch.tensor(value))
    guard.check(3)


def test_the_cpu_policy_reads_the_loss_and_keeps_no_device_flag(monkeypatch):
    """The CPU's policy builds no flag tensor per step; an accelerator's never reads the loss back."""
    guard = NonFiniteGuard()
    guard.observe(torch.tensor(float("nan")))
    assert guard._flag is None and guard._seen_on_host
    monkeypatch.setattr(host_reads, "host_reads_are_free", lambda device: False)
    guard = NonFiniteGuard()
    guard.observe(torch.tensor(float("nan")))
    assert guard._flag is not None and not guard._seen_on_host
