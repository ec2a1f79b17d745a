"""Matryoshka head + loss, forward + backward: fused vs the paper's per-size formulation vs one Linear+CE.

    python benchmarks/head_loss.py            # B=256, D=2048, nesting 8..2048, C in {1000, 21841}
    python benchmarks/head_loss.py --quick    # tiny shapes (smoke test)

Variants are run interleaved (one repetition of each in turn) and compared as ratios of medians and of
minima (the minimum is the repetition least disturbed by other jobs on a shared machine), so a noisy
machine slows them alike. The two target ratios are also given per repetition: the ratio of the two
variants' times within each repetition (neighbours in time, so slow drifts of the machine's load
cancel), their median and its 95% bootstrap interval, which says whether a target is met beyond the
run's noise. ``matmuls`` is the per-size code's matmuls alone (forward and backward of its
``nn.Linear``s with a fixed upstream gradient, no cross-entropy): a floor for any formulation with the
same FLOPs. A second table times the narrow matmuls that ``mrl.nn.fused.mm_columns`` widens, a third
MRL-E's per-chunk matmuls against one full-width matmul of the same FLOPs (the plain head's), both with
batch-major and with class-major logits. The fourth asks whether untied MRL's per-size loop of matmuls
would be faster as one batched call (zero-padded ``bmm``, nested-tensor ``bmm``). The fifth and sixth
compare the two layouts of the fused node's logits (``--layout-classes``): one softmax alone, then the
whole step against each target's baseline. The last gives each variant's fixed cost per step
(dispatch and Python: the same D and nesting at B=4, C=3).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _stats import format_interval, paired_ratio
from torch import nn

import mrl.nn.fused_cross_entropy as fused_ce
from mrl import MatryoshkaLinear, MatryoshkaLoss
from mrl.nn.fused import chunk_bounds, mm_columns


class PerSizeMRL(nn.Module):
    """The paper's MRL code: a separate ``nn.Linear`` per size and one cross-entropy per size."""

    def __init__(self, dim: int, classes: int, nesting: list[int], efficient: bool) -> None:
        super().__init__()
        self.nesting, self.efficient = nesting, efficient
        if efficient:
            self.layers = nn.ModuleList([nn.Linear(dim, classes)])
        else:
            self.layers = nn.ModuleList([nn.Linear(m, classes) for m in nesting])

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = z.new_zeros(())
        for g, m in enumerate(self.nesting):
            if self.efficient:  # MRL-E in the paper's code: slice the one weight per size
                layer = self.layers[0]
                logits = F.linear(z[:, :m], layer.weight[:, :m], layer.bias)
            else:
                logits = self.layers[g](z[:, :m])
            loss = loss + F.cross_entropy(logits, y)
        return loss


class Fused(nn.Module):
    def __init__(self, dim: int, classes: int, nesting: list[int], efficient: bool, fused: bool) -> None:
        super().__init__()
        self.head = MatryoshkaLinear(dim, classes, nesting, efficient=efficient, fused=fused)
        self.loss = MatryoshkaLoss(fused=fused)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The training path: with fused=True head and cross-entropy are one autograd node.
        per_size, _ = self.loss.per_size_from_embedding(self.head, z, y)
        return self.loss.combine(per_size)


class PerSizeMatmuls(PerSizeMRL):
    """Only the matmuls of :class:`PerSizeMRL`: its logits, back-propagated with a fixed gradient."""

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = []
        for g, m in enumerate(self.nesting):
            layer = self.layers[0] if self.efficient else self.layers[g]
            weight = layer.weight[:, :m] if self.efficient else layer.weight
            logits.append(F.linear(z[:, :m], weight, layer.bias))
        if not hasattr(self, "upstream"):
            self.upstream = [torch.randn_like(lg) for lg in logits]
        return _Backward(logits, self.upstream)


class _Backward:
    """Stands in for a loss: ``.backward()`` sends ``upstream`` into the logits."""

    def __init__(self, outputs: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        self.outputs, self.grads = outputs, grads

    def backward(self) -> None:
        torch.autograd.backward(self.outputs, self.grads)


class Plain(nn.Module):
    """A standard model's head: one Linear on the full embedding and one cross-entropy."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, classes)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.fc(z), y)


class Forced(nn.Module):
    """``model`` with one of the fused node's path rules (``_class_major``: the logits' layout;
    ``_all_sizes_at_once``: the softmax passes per size or for all sizes) replaced by ``value`` around its
    forward, as the tests force each path; backward follows the buffer forward made."""

    def __init__(self, model: nn.Module, rule: str, value: bool) -> None:
        super().__init__()
        self.model, self.rule, self.value = model, rule, value

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        original = getattr(fused_ce, self.rule)
        setattr(fused_ce, self.rule, lambda *_: self.value)
        try:
            return self.model(z, y)
        finally:
            setattr(fused_ce, self.rule, original)


def step_time(model: nn.Module, z: torch.Tensor, y: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    z.grad = None
    start = time.perf_counter()
    model(z, y).backward()
    return time.perf_counter() - start


def run_case(batch: int, dim: int, classes: int, nesting: list[int], efficient: bool, reps: int) -> dict:
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(classes, (batch,))
    variants: dict[str, nn.Module] = {
        "fused": Fused(dim, classes, nesting, efficient, fused=True),
        "per_size": PerSizeMRL(dim, classes, nesting, efficient),
        "reference": Fused(dim, classes, nesting, efficient, fused=False),
        "plain": Plain(dim, classes),
        "matmuls": PerSizeMatmuls(dim, classes, nesting, efficient),
    }
    times = _step_times(variants, z, y, reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    paired = {name: paired_ratio(times["fused"], times[base]) for name, base in PAIRED.items()}
    return {
        "head": "MRL-E" if efficient else "MRL",
        "C": classes,
        **{f"{k}_ms": 1000 * v for k, v in med.items()},
        "fused/per_size": med["fused"] / med["per_size"],
        "fused/plain": med["fused"] / med["plain"],
        "fused/per_size min": low["fused"] / low["per_size"],
        "fused/plain min": low["fused"] / low["plain"],
        "reference/per_size": med["reference"] / med["per_size"],
        "matmuls/per_size": med["matmuls"] / med["per_size"],
        **{f"{name} paired": ratio for name, ratio in paired.items()},
    }


# The targets' ratios, given per repetition too (see the module docstring).
PAIRED = {"fused/per_size": "per_size", "fused/plain": "plain"}


def _interleaved_times(variants: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Seconds of ``reps`` runs of each variant, the variants run in turn after one warm-up run each
    (allocator, BLAS kernels); each variant times itself and returns its seconds."""
    times: dict[str, list[float]] = {key: [] for key in variants}
    for fn in variants.values():
        fn()
    for _ in range(reps):
        for key, fn in variants.items():
            times[key].append(fn())
    return times


def _step_times(
    models: dict[str, nn.Module], z: torch.Tensor, y: torch.Tensor, reps: int
) -> dict[str, list[float]]:
    """Seconds of each model's forward+backward steps (:func:`step_time`), the models run in turn."""
    steps = {name: functools.partial(step_time, model, z, y) for name, model in models.items()}
    return _interleaved_times(steps, reps)


def _timed(fn: Callable[[], object]) -> Callable[[], float]:
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def _interleaved_medians(cases: dict[str, dict[str, Callable]], reps: int) -> dict[str, dict[str, float]]:
    """Median ms of each variant of each case, the variants of a case run in turn."""
    medians = {}
    for name, variants in cases.items():
        times = _interleaved_times({key: _timed(fn) for key, fn in variants.items()}, reps)
        medians[name] = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return medians


def narrow_gemms(batch: int, dim: int, classes: int, reps: int) -> list[dict]:
    """Backward matmuls of the first MRL-E chunk (8 columns of a ``dim``-column matrix) from a batch-major
    and a class-major logit gradient: direct vs through :func:`mrl.nn.fused.mm_columns`'s 16-column
    window, medians in ms."""
    torch.manual_seed(0)
    weight, z = torch.randn(classes, dim), torch.randn(batch, dim)
    grad_z, grad_w = torch.empty(batch, dim), torch.empty(classes, dim)
    cases = {}
    for layout, acc in (("batch", torch.randn(batch, classes)), ("class", torch.randn(classes, batch).t())):
        cases[(layout, "grad_z")] = {
            "direct": lambda acc=acc: torch.mm(acc, weight[:, :8], out=grad_z[:, :8]),
            "windowed": lambda acc=acc: mm_columns(acc, weight, 0, 8, out=grad_z[:, :8]),
        }
        cases[(layout, "grad_w")] = {
            "direct": lambda acc=acc: torch.mm(acc.t(), z[:, :8], out=grad_w[:, :8]),
            "windowed": lambda acc=acc: mm_columns(acc.t(), z, 0, 8, out=grad_w[:, :8]),
        }
    medians = _interleaved_medians(cases, reps)
    return [{"C": classes, "layout": lay, "product": name, **t} for (lay, name), t in medians.items()]


def chunked_gemms(batch: int, dim: int, classes: int, nesting: list[int], reps: int) -> list[dict]:
    """MRL-E's matmuls as the fused node issues them, one per chunk between consecutive sizes (forward
    into the running prefix sum, backward through ``mm_columns``), with batch-major and with class-major
    logits, against one full-width batch-major matmul of the same FLOPs (what the plain head issues),
    medians in ms."""
    torch.manual_seed(0)
    weight, z = torch.randn(classes, dim), torch.randn(batch, dim)
    grad_z, grad_w = torch.empty(batch, dim), torch.empty(classes, dim)
    batch_major = torch.randn(batch, classes)
    class_major = batch_major.t().contiguous().t()  # same (B, C) values, (C, B) in memory
    bounds = chunk_bounds(nesting)

    def forward_chunks(logits: torch.Tensor) -> None:
        torch.mm(z[:, : nesting[0]], weight[:, : nesting[0]].t(), out=logits)
        for s, e in bounds[1:]:
            logits.addmm_(z[:, s:e], weight[:, s:e].t())

    def grad_z_chunks(acc: torch.Tensor) -> None:
        for s, e in bounds:
            mm_columns(acc, weight, s, e, out=grad_z[:, s:e])

    def grad_w_chunks(acc: torch.Tensor) -> None:
        for s, e in bounds:
            mm_columns(acc.t(), z, s, e, out=grad_w[:, s:e])

    cases = {
        "forward": {"full": lambda: torch.mm(z, weight.t(), out=batch_major),
                    "batch-major": lambda: forward_chunks(batch_major),
                    "class-major": lambda: forward_chunks(class_major)},
        "grad_z": {"full": lambda: torch.mm(batch_major, weight, out=grad_z),
                   "batch-major": lambda: grad_z_chunks(batch_major),
                   "class-major": lambda: grad_z_chunks(class_major)},
        "grad_w": {"full": lambda: torch.mm(batch_major.t(), z, out=grad_w),
                   "batch-major": lambda: grad_w_chunks(batch_major),
                   "class-major": lambda: grad_w_chunks(class_major)},
    }  # fmt: skip
    medians = _interleaved_medians(cases, reps)
    return [{"C": classes, "product": name, **times} for name, times in medians.items()]


def untied_batched(batch: int, dim: int, classes: int, nesting: list[int], reps: int) -> dict:
    """Untied MRL's forward products, medians in ms: the per-size loop the fused node runs (one matmul per
    size on column blocks of the ``(C, sum(nesting))`` weight) against one batched call: a ``bmm`` over
    the weights zero-padded to ``(G, D, C)``, and a ``bmm`` of nested tensors (the sizes' ragged operands),
    both built once outside the timing (which favours them: a step would rebuild them from the weight
    every step), and the nested ``bmm`` with its operands built from ``z`` and the weight inside the
    timing. Last, the per-size loop over the nested tensors' operands (contiguous copies, built once):
    it tells a batched call's own gain from that of its operands' memory layout; and the same loop with
    those copies made inside the timing, the price of taking that layout at every step."""
    torch.manual_seed(0)
    offsets = [sum(nesting[:g]) for g in range(len(nesting))]
    weight, z = torch.randn(classes, sum(nesting)), torch.randn(batch, dim)
    blocks = [weight[:, o : o + m].t() for o, m in zip(offsets, nesting, strict=True)]
    out = torch.empty(len(nesting), batch, classes)
    padded = torch.zeros(len(nesting), dim, classes)
    for g, (block, m) in enumerate(zip(blocks, nesting, strict=True)):
        padded[g, :m] = block

    def copies() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return [z[:, :m].contiguous() for m in nesting], [b.contiguous() for b in blocks]

    z_copies, block_copies = copies()

    def nested(z_parts: list[torch.Tensor], w_parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with warnings.catch_warnings():  # nested tensors are a prototype API and say so
            warnings.simplefilter("ignore")
            return torch.nested.nested_tensor(z_parts), torch.nested.nested_tensor(w_parts)

    nested_z, nested_w = nested(z_copies, block_copies)

    def loop(z_parts: list[torch.Tensor], w_parts: list[torch.Tensor]) -> None:
        for g in range(len(nesting)):
            torch.mm(z_parts[g], w_parts[g], out=out[g])

    z_views = [z[:, :m] for m in nesting]
    variants = {
        "loop": lambda: loop(z_views, blocks),
        "padded bmm": lambda: torch.bmm(z.expand(len(nesting), -1, -1), padded, out=out),
        "nested bmm": lambda: torch.bmm(nested_z, nested_w),
        "nested bmm, built": lambda: torch.bmm(*nested(z_views, [b.contiguous() for b in blocks])),
        "loop, contiguous": lambda: loop(z_copies, block_copies),
        "loop, copied": lambda: loop(*copies()),
    }
    return {"C": classes, **_interleaved_medians({"forward": variants}, reps)["forward"]}


def softmax_layouts(batch: int, classes: int, reps: int) -> dict:
    """One size's softmax over classes, medians in ms: ``torch.softmax`` on batch-major logits, the same on
    class-major logits (a strided class dimension), and the fused node's class-major softmax
    (``_shifted_exp_into``: exponentials, row maxima and sums, left unnormalised)."""
    torch.manual_seed(0)
    logits = torch.randn(batch, classes)
    batch_out, class_out = torch.empty(batch, classes), torch.empty(classes, batch).t()
    class_logits = logits.t().contiguous().t()
    row_max, row_sum = torch.empty(batch), torch.empty(batch)
    variants = {
        "batch-major": lambda: torch.softmax(logits, 1, out=batch_out),
        "class-major torch": lambda: torch.softmax(class_logits, 1, out=class_out),
        "class-major fused": lambda: fused_ce._shifted_exp_into(class_logits, class_out, row_max, row_sum),
    }
    return {"C": classes, **_interleaved_medians({"softmax": variants}, reps)["softmax"]}


def layouts(batch: int, dim: int, classes: int, nesting: list[int], efficient: bool, reps: int) -> dict:
    """The fused step with its logits forced batch-major and forced class-major, against the target's
    baseline: one plain Linear + CE for MRL-E, the per-size code for MRL (medians in ms and ratios), and
    class-major's time over batch-major's per repetition (see :func:`paired_ratio`)."""
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(classes, (batch,))
    fused = Fused(dim, classes, nesting, efficient, fused=True)
    baseline = Plain(dim, classes) if efficient else PerSizeMRL(dim, classes, nesting, efficient)
    models = {
        "batch": Forced(fused, "_class_major", False),
        "class": Forced(fused, "_class_major", True),
        "baseline": baseline,
    }
    times = _step_times(models, z, y, reps)
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "head": "MRL-E" if efficient else "MRL",
        "C": classes,
        "baseline": "plain" if efficient else "per-size",
        **{f"{k}_ms": v for k, v in med.items()},
        "class/batch paired": paired_ratio(times["class"], times["batch"]),
        "default": "class" if fused_ce._class_major(z.device, classes, batch, efficient) else "batch",
    }


def small_heads(batch: int, dim: int, classes: int, nesting: list[int], efficient: bool, reps: int) -> dict:
    """The fused step (batch-major logits) with its softmax passes per size and for all sizes at once
    (see ``mrl.nn.fused_cross_entropy._all_sizes_at_once``): medians in ms, at-once's time over per-size's
    per repetition, the ``(G, B, C)`` buffer's KiB and the form the node takes by itself."""
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(classes, (batch,))
    fused = Forced(Fused(dim, classes, nesting, efficient, fused=True), "_class_major", False)
    models = {
        "per size": Forced(fused, "_all_sizes_at_once", False),
        "at once": Forced(fused, "_all_sizes_at_once", True),
    }
    times = _step_times(models, z, y, reps)
    buffer = len(nesting) * batch * classes * 4
    return {
        "head": "MRL-E" if efficient else "MRL",
        "C": classes,
        "KiB": buffer / 1024,
        **{f"{k}_ms": 1000 * statistics.median(v) for k, v in times.items()},
        "at once/per size paired": paired_ratio(times["at once"], times["per size"]),
        "default": "at once" if fused_ce._all_sizes_at_once(z.device, False, classes) else "per size",
    }


def print_small_heads(batch: int, dim: int, classes: list[int], nesting: list[int], reps: int) -> list[dict]:
    """Print :func:`small_heads` for MRL-E and MRL at each class count."""
    print(
        "\nfused step, batch-major logits: softmax passes per size vs for all sizes at once, medians in ms;"
    )
    print("at once/per size per repetition (median, 95% bootstrap interval); default: the node's own choice")
    cols = f"{'per size':>9} {'at once':>9} {'at once/per size':>24} {'default':>9}"
    print(f"{'head':6} {'C':>6} {'KiB':>7} {cols}")
    return _rows_per_head_and_class(
        classes,
        lambda efficient, c: small_heads(batch, dim, c, nesting, efficient, reps),
        lambda r, c: (
            f"{r['head']:6} {c:>6} {r['KiB']:7.0f} {r['per size_ms']:9.3f} {r['at once_ms']:9.3f} "
            f"{format_interval(r['at once/per size paired']):>24} {r['default']:>9}"
        ),
    )


def _rows_per_head_and_class(
    classes: list[int], run: Callable[[bool, int], dict], line: Callable[[dict, int], str]
) -> list[dict]:
    """``run(efficient, C)`` for MRL-E then MRL at each class count, each result printed as ``line``."""
    rows = []
    for efficient in (True, False):
        for c in classes:
            rows.append(run(efficient, c))
            print(line(rows[-1], c), flush=True)
    return rows


def fixed_costs(dim: int, nesting: list[int], reps: int) -> dict[str, float]:
    """Median ms of a forward+backward step at B=4, C=3: what a step costs beyond its arithmetic (torch
    dispatch, Python, BLAS call overhead), which the full-size steps pay on top of their work."""
    torch.manual_seed(0)
    z = torch.randn(4, dim, requires_grad=True)
    y = torch.randint(3, (4,))
    models = {
        "fused MRL-E": Fused(dim, 3, nesting, True, True),
        "fused MRL": Fused(dim, 3, nesting, False, True),
        "plain": Plain(dim, 3),
    }
    times = _step_times(models, z, y, reps)
    return {name: 1000 * statistics.median(v) for name, v in times.items()}


# aten ops by what they do, for --profile (self CPU time; everything else is dispatch and Python).
OP_KINDS = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::addmm_"),
    # the class-major path's softmax is amax, sub and exp_ (its row sums are counted as elementwise)
    "softmax": ("aten::_softmax", "aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::amax",
                "aten::sub", "aten::exp_"),
    "elementwise": ("aten::addcmul_", "aten::mul_", "aten::mul", "aten::scatter_add_", "aten::copy_",
                    "aten::add_", "aten::sum", "aten::fill_", "aten::gather", "aten::nll_loss_forward",
                    "aten::nll_loss_backward", "aten::zero_"),
}  # fmt: skip


def profile_case(batch: int, dim: int, classes: int, nesting: list[int], efficient: bool, reps: int) -> dict:
    """ms per step of the fused and the plain variant by kind of work, from ``torch.profiler``."""
    torch.manual_seed(0)
    z = torch.randn(batch, dim, requires_grad=True)
    y = torch.randint(classes, (batch,))
    row: dict = {"head": "MRL-E" if efficient else "MRL", "C": classes}
    variants = {"fused": Fused(dim, classes, nesting, efficient, True), "plain": Plain(dim, classes)}
    for name, model in variants.items():
        step_time(model, z, y)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(reps):
                step_time(model, z, y)
        wall = (time.perf_counter() - start) / reps
        self_ms = {e.key: e.self_cpu_time_total / 1000 / reps for e in prof.key_averages()}
        kinds = {kind: sum(self_ms.get(op, 0.0) for op in ops) for kind, ops in OP_KINDS.items()}
        kinds["other"] = 1000 * wall - sum(kinds.values())
        row.update({f"{name} {kind}": ms for kind, ms in kinds.items()})
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 repetitions (smoke test)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256, help="B of every full-size table")
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 21841])
    parser.add_argument(
        "--layout-classes",
        type=int,
        nargs="*",
        default=[1000, 2000, 4000, 8000, 21841],
        help="class counts of the batch-major vs class-major table (empty: skip it)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="instead: fused and plain split by kind of work (profiler)"
    )
    parser.add_argument(
        "--small-heads",
        type=int,
        nargs="*",
        metavar="C",
        help="instead: softmax passes per size vs all at once, at these class counts (default: 10 to "
        "1000), with the default job's B, D and nesting",
    )
    args = parser.parse_args(argv)
    if args.quick:
        batch, dim, classes, layout_classes, reps = 16, 64, [10, 33], [10, 33], 2
    else:
        batch, dim, classes, layout_classes, reps = (
            args.batch,
            2048,
            args.classes,
            args.layout_classes,
            args.reps,
        )
    nesting = [2**i for i in range(3, dim.bit_length())]  # 8, 16, ..., dim
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, B={batch} D={dim} nesting={nesting}")
    if args.profile:
        return profile_all(batch, dim, classes, nesting, reps)
    if args.small_heads is not None:
        job_batch, job_dim, _, job_nesting = default_job_head()
        if args.quick:
            job_batch, job_dim, job_nesting = batch, dim, [1, 2, 4, 8, 16, 32, 64]
        small = args.small_heads or ([10, 33] if args.quick else [10, 20, 32, 50, 100, 1000])
        print(f"B={job_batch} D={job_dim} nesting={job_nesting}")
        return print_small_heads(job_batch, job_dim, small, job_nesting, 2 if args.quick else max(reps, 30))
    print("medians in ms; ratios of medians, and of minima in brackets")
    header = f"{'head':6} {'C':>6} {'fused':>8} {'per-size':>9} {'ref':>8} {'plain':>8} {'matmuls':>8}"
    header += f" {'fused/per-size':>16} {'fused/plain':>15} {'ref/per-size':>13} {'matmuls/per-size':>17}"
    print(header)
    rows = _rows_per_head_and_class(
        classes,
        lambda efficient, c: run_case(batch, dim, c, nesting, efficient, reps),
        lambda r, c: (
            f"{r['head']:6} {c:>6} {r['fused_ms']:8.1f} {r['per_size_ms']:9.1f} {r['reference_ms']:8.1f} "
            f"{r['plain_ms']:8.1f} {r['matmuls_ms']:8.1f} "
            f"{r['fused/per_size']:7.3f} [{r['fused/per_size min']:.3f}] "
            f"{r['fused/plain']:6.3f} [{r['fused/plain min']:.3f}] "
            f"{r['reference/per_size']:13.3f} {r['matmuls/per_size']:17.3f}"
        ),
    )
    print("\nthe target ratios per repetition: median of the paired ratios (95% bootstrap interval)")
    print(f"{'head':6} {'C':>6} {'fused/per-size':>24} {'fused/plain':>24}")
    for r in rows:
        cells = " ".join(f"{format_interval(r[f'{name} paired']):>24}" for name in PAIRED)
        print(f"{r['head']:6} {r['C']:>6} {cells}")
    if dim >= 16:
        print("\nnarrow backward matmuls (first MRL-E chunk, 8 columns), medians in ms")
        print(f"{'C':>6} {'layout':6} {'product':8} {'direct':>8} {'windowed':>9}")
        for c in classes:
            for r in narrow_gemms(batch, dim, c, reps):
                rows.append(r)
                print(f"{c:>6} {r['layout']:6} {r['product']:8} {r['direct']:8.2f} {r['windowed']:9.2f}")
    print("\nMRL-E's matmuls per chunk, as the fused node issues them with batch-major and with class-major")
    print("logits, vs one full-width batch-major matmul (the plain head's), medians in ms")
    print(
        f"{'C':>6} {'product':8} {'full':>8} {'batch-major':>12} {'class-major':>12} {'ratios to full':>15}"
    )
    for c in classes:
        for r in chunked_gemms(batch, dim, c, nesting, reps):
            rows.append(r)
            print(
                f"{c:>6} {r['product']:8} {r['full']:8.2f} {r['batch-major']:12.2f} {r['class-major']:12.2f}"
                f" {r['batch-major'] / r['full']:7.3f} {r['class-major'] / r['full']:7.3f}",
                flush=True,
            )
    rows += print_untied_batched(batch, dim, min(classes), nesting, reps)
    if layout_classes:
        rows += print_layouts(batch, dim, layout_classes, nesting, reps)
    fixed = fixed_costs(dim, nesting, 50 * reps)
    rows.append(fixed)
    print("\nfixed cost of a step (B=4, C=3, same D and nesting), medians in ms")
    print("  ".join(f"{name} {ms:.2f}" for name, ms in fixed.items()))
    return rows


def default_job_head() -> tuple[int, int, int, list[int]]:
    """``(B, D, C, nesting)`` of the default job's head (``mrl-train`` with no overrides), read from the
    composed config and the module it builds, so this table follows the default job when it changes."""
    import tempfile

    from _common import compose_cfg  # imported here: tests load this file for its helpers alone

    from mrl.training.assemble import assemble

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_cfg([], out)
    head = assemble(cfg)[0].head
    return int(cfg.data.batch_size), head.in_features, head.num_classes, list(head.nesting)


def print_untied_batched(batch: int, dim: int, classes: int, nesting: list[int], reps: int) -> list[dict]:
    """Print :func:`untied_batched` at ``classes`` (the run's smallest class count, where per-call costs
    weigh most: a batched formulation's best case) and at the default job's head (see
    :func:`default_job_head`; in every mode: it is cheap)."""
    job = default_job_head()
    shapes = {
        f"B={batch} D={dim} C={classes}": (batch, dim, classes, nesting),
        f"default job's, B={job[0]} D={job[1]} C={job[2]}": job,
    }
    variants = ["loop", "padded bmm", "nested bmm", "nested bmm, built", "loop, contiguous", "loop, copied"]
    print(
        "\nuntied MRL's forward products, the fused node's per-size loop vs one batched call, medians in ms"
    )
    print("and [ratios to the loop]")
    print(f"{'head':32} " + " ".join(f"{v:>17}" for v in variants))
    rows = []
    for name, shape in shapes.items():
        r = {"head": name, **untied_batched(*shape, max(reps, 2 * len(variants)))}
        rows.append(r)
        cells = [f"{r['loop']:.2f}"] + [f"{r[v]:.2f} [{r[v] / r['loop']:.3f}]" for v in variants[1:]]
        print(f"{name:32} " + " ".join(f"{c:>17}" for c in cells), flush=True)
    return rows


def print_layouts(batch: int, dim: int, classes: list[int], nesting: list[int], reps: int) -> list[dict]:
    """Print :func:`softmax_layouts`, then :func:`layouts` for MRL-E and MRL, at each class count."""
    rows = []
    variants = ["batch-major", "class-major torch", "class-major fused"]
    print("\none size's softmax over classes by layout of the logits, medians in ms")
    print(f"{'C':>6} " + " ".join(f"{v:>18}" for v in variants))
    for c in classes:
        r = softmax_layouts(batch, c, 10 * reps)
        rows.append(r)
        print(f"{c:>6} " + " ".join(f"{r[v]:18.2f}" for v in variants), flush=True)
    print("\nfused step, batch-major vs class-major logits, against MRL-E's target baseline (plain) and")
    print("MRL's (per-size), medians in ms; class/batch per repetition (median, 95% bootstrap interval);")
    print("default: the layout the node takes by itself")
    cols = ["batch", "class", "baseline", "batch/base", "class/base"]
    print(
        f"{'head':6} {'C':>6} " + " ".join(f"{c:>10}" for c in cols) + f" {'class/batch':>24} {'default':>8}"
    )
    for efficient in (True, False):
        for c in classes:
            r = layouts(batch, dim, c, nesting, efficient, reps)
            rows.append(r)
            base = r["baseline_ms"]
            print(
                f"{r['head']:6} {c:>6} {r['batch_ms']:10.1f} {r['class_ms']:10.1f} {base:10.1f} "
                f"{r['batch_ms'] / base:10.3f} {r['class_ms'] / base:10.3f} "
                f"{format_interval(r['class/batch paired']):>24} {r['default']:>8}",
                flush=True,
            )
    return rows


def profile_all(batch: int, dim: int, classes: list[int], nesting: list[int], reps: int) -> list[dict]:
    """Print :func:`profile_case` for MRL-E and MRL at each class count."""
    kinds = [*OP_KINDS, "other"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        torch.ones(1).sum()  # the profiler's one-off start-up cost, kept out of the first case
    print("ms per step by kind of work (profiler self CPU time; other = wall minus the rest: dispatch,")
    print("Python and the profiler's own per-op cost, so the other column overstates the unprofiled one)")
    print(f"{'head':6} {'C':>6} {'variant':8} " + " ".join(f"{k:>11}" for k in kinds))
    rows = []
    for efficient in (True, False):
        for c in classes:
            r = profile_case(batch, dim, c, nesting, efficient, reps)
            rows.append(r)
            for variant in ("fused", "plain"):
                cells = " ".join(f"{r[f'{variant} {k}']:11.1f}" for k in kinds)
                print(f"{r['head']:6} {c:>6} {variant:8} {cells}", flush=True)
    return rows


if __name__ == "__main__":
    main()
