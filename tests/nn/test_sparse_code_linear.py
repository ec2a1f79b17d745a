"""The classifiers of a CSR model's sizes (mrl.nn.sparse_code_linear) against a plain reference: the code
of the k largest units of each row, computed row by row, times each size's own weights."""

from __future__ import annotations

import torch

from mrl.nn.sparse_code_linear import SparseCodeLinear


def reference_logits(z: torch.Tensor, head: SparseCodeLinear) -> torch.Tensor:
    out = []
    for g, k in enumerate(head.nesting):
        code = torch.zeros_like(z)
        for row in range(z.shape[0]):
            order = sorted(range(z.shape[1]), key=lambda u: -float(z[row, u]))[:k]
            code[row, order] = z[row, order].clamp_min(0)
        weight = head.weight[:, g * head.in_features : (g + 1) * head.in_features]
        out.append(code @ weight.T + head.bias[g])
    return torch.stack(out)


def test_every_size_reads_its_k_largest_units_with_its_own_classifier():
    torch.manual_seed(0)
    head = SparseCodeLinear(hidden=12, num_classes=3, nesting=[1, 3, 6]).double()
    z = torch.relu(torch.randn(5, 12, dtype=torch.float64))
    z[0, 2:] = 0  # a row with fewer non-zeros than the largest k
    want = reference_logits(z, head)
    torch.testing.assert_close(head(z), want)
    for g in range(3):  # one size alone (mrl-eval's linear evaluator) gives the same
        torch.testing.assert_close(head.size_logits(z, g), want[g])
