"""What every evaluator reads: the exported embeddings and labels (of the splits and of any query sets
beyond them), the trained head and sizes, where to compute, chunk sizes, seed, the neighbours of each
size (searched once, shared) and the report sections of the evaluators that ran before it.

"The size-d view" is one concept here: the prefix ``z[:, :d]`` of a Matryoshka model, or for a CSR
model (``kind`` ``csr``) the code of its ``d`` largest units (:mod:`mrl.eval.sparse_eval`).
:meth:`EvalContext.neighbours` searches whichever it is, so every evaluator that ranks by it (kNN,
retrieval, the quantized stage's float32 rows) is right for both.

"The queries are the database" is one concept too: when the query split is the database split (or another
name for the same items: an image folder or shards without a test split evaluate the validation images as
``test``), :attr:`EvalContext.exclude_self` is set, every search leaves each query's own item out of its
neighbours (:mod:`mrl.eval.knn`), and report.json's ``evaluated.exclude_self`` says so."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from mrl.eval.knn import CHUNK_BYTES, candidates, chunk_rows, exact_search
from mrl.eval.prefix_search import search_all_sizes
from mrl.eval.sparse_codes import TopCodes, top_codes
from mrl.eval.sparse_eval import code_search
from mrl.nn.matryoshka_linear import MatryoshkaLinear
from mrl.nn.sparse_code_linear import SparseCodeLinear

log = logging.getLogger(__name__)
# head.kind of the models whose size-d view is a sparse top-d code, not a prefix
SPARSE_KINDS = ("csr",)
# conf/eval.yaml search: auto (one_pass on a GPU, per_size on the CPU), one_pass or per_size
SEARCHES = ("auto", "one_pass", "per_size")


@dataclass(frozen=True)
class Chunks:
    """``chunks`` of conf/eval.yaml (what each bounds is said there)."""

    query: int
    database: int
    rerank: int
    head: int

    @classmethod
    def from_config(cls, chunks: DictConfig) -> Chunks:
        return cls(int(chunks.query), int(chunks.database), int(chunks.rerank), int(chunks.head))


def methods_on(cfg: DictConfig) -> frozenset[str]:
    """The ``methods.<name>`` of an evaluation config that are on."""
    return frozenset(name for name, on in cfg.methods.items() if on)


@dataclass(frozen=True)
class QuerySet:
    """A set of queries beyond the data's splits that an evaluator needs embedded (a robustness set).
    Opened, and refused, before any embedding is computed, then exported with the splits as
    ``<evaluator>_<name>_embeddings.npy`` and reused while the checkpoint and ``identity`` are unchanged."""

    name: str
    dataset: Dataset  # its items, as the datamodule's evaluation loader batches them
    identity: dict[str, str]  # what identifies its items beyond the checkpoint (root, files and labels)
    spec: Any  # what its evaluator reads back (a robustness set's root, covered classes, restriction)


@dataclass(frozen=True)
class EmbeddedSet:
    """A query set's exported embeddings ``(N, D)`` and labels ``(N,)``."""

    set: QuerySet
    embeddings: np.ndarray
    labels: np.ndarray


@dataclass
class EvalContext:
    """One evaluation's inputs, shared by the evaluators (``mrl.eval.evaluators``)."""

    database: np.ndarray  # (N, D) embeddings of the database split (a read-only memmap)
    db_labels: np.ndarray  # (N,)
    queries: np.ndarray  # (Q, D) embeddings of the query split
    query_labels: np.ndarray  # (Q,)
    head: MatryoshkaLinear | SparseCodeLinear  # the trained classifiers, on the CPU
    nesting: list[int]  # the trained sizes
    sizes: list[int]  # the sizes to report (the nesting or sizes=)
    kind: str | None  # the training run's head.kind: mrl, mrl_e, ff, standard, csr, adaptor
    device: torch.device  # where searches may run (a faiss GPU index on cuda)
    chunks: Chunks
    seed: int
    methods: frozenset[str]  # the methods.<name> that are on
    search: str  # how the prefixes' neighbours are searched: one of SEARCHES (conf/eval.yaml search)
    # the queries are the database's own items (query i = database row i): each leaves out its own
    exclude_self: bool = False
    # report sections of the evaluators that already ran
    sections: dict[str, Any] = field(default_factory=dict)
    # the query sets beyond the splits, by the evaluator that asked for them (exported with the splits,
    # before any evaluator runs)
    query_sets: dict[str, list[EmbeddedSet]] = field(init=False, default_factory=dict)
    # each size's neighbour ids (queries x k, best first), searched on first use
    _neighbour_ids: dict[int, np.ndarray] = field(init=False, default_factory=dict, repr=False)
    # a CSR model's sparse searches, by size: what each measured (mrl.eval.sparse_eval.code_search)
    sparse_searches: dict[int, dict[str, Any]] = field(init=False, default_factory=dict)
    # a CSR model's database codes, sorted once for every size (database_codes)
    _database_codes: TopCodes | None = field(init=False, default=None)

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        database: tuple[np.ndarray, np.ndarray],
        queries: tuple[np.ndarray, np.ndarray],
        head: MatryoshkaLinear | SparseCodeLinear,
        sizes: list[int],
        kind: str | None,
        device: torch.device,
        exclude_self: bool = False,
    ) -> EvalContext:
        """The context of an evaluation config (conf/eval.yaml): its chunks, seed and the methods that are
        on, with ``(embeddings, labels)`` of the database and query splits (``exclude_self``: the same
        items, :func:`same_items`)."""
        return cls(
            database=database[0],
            db_labels=database[1],
            queries=queries[0],
            query_labels=queries[1],
            head=head,
            nesting=list(head.nesting),
            sizes=list(sizes),
            kind=kind,
            device=device,
            chunks=Chunks.from_config(cfg.chunks),
            seed=int(cfg.seed),
            methods=methods_on(cfg),
            search=str(cfg.get("search", "auto")),
            exclude_self=exclude_self,
        )

    @property
    def embed_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def candidates(self) -> int:
        """How many database items each query can have as neighbours (all but its own when
        :attr:`exclude_self`)."""
        return candidates(len(self.database), self.exclude_self)

    @property
    def sparse(self) -> bool:
        """Whether the size-d view is the top-d sparse code of ``z`` (a CSR model), not its prefix."""
        return self.kind in SPARSE_KINDS

    def skip(self, name: str, reason: str) -> None:
        """Record (report.json ``skipped``) and log that ``name`` (an evaluator or a setting) was not
        measured, and why."""
        log.info("%s skipped: %s", name, reason)
        self.sections.setdefault("skipped", {})[name] = reason

    @property
    def one_pass(self) -> bool:
        """Whether the prefixes' neighbours come from one pass for every reported size
        (:func:`~mrl.eval.prefix_search.search_all_sizes`) rather than faiss's flat search per size: on
        a GPU, unless :attr:`search` says which."""
        return self.device.type == "cuda" if self.search == "auto" else self.search == "one_pass"

    def database_codes(self, width: int) -> TopCodes:
        """A CSR model's stored database codes with each row's largest units sorted, at least ``width``
        of them (and every reported size's): one pass over the stored embeddings (a memmap of N x
        hidden), from which every size's codes are built (:func:`~mrl.eval.sparse_codes.top_codes`)."""
        if self._database_codes is None or self._database_codes.width < width:
            width = max(width, *self.sizes)
            rows = chunk_rows(self.chunks.database, self.database.shape[1])
            start = time.perf_counter()
            self._database_codes = top_codes(self.database, width, rows)
            log.info(
                "database codes: the %d largest units of %d rows sorted in %.1fs",
                width,
                len(self.database),
                time.perf_counter() - start,
            )
        return self._database_codes

    def neighbours(self, d: int, k: int) -> np.ndarray:
        """Ids ``(Q, k)`` of each query's ``k`` nearest database items by the size-``d`` views, best
        first: one exact search per size, shared by every evaluator that ranks by it (kNN, retrieval,
        the baselines' 1-NN, quantised retrieval's float32 rows). Prefixes: cosine, every reported size
        from one pass (:func:`~mrl.eval.prefix_search.search_all_sizes`, on the GPU when the evaluation
        runs on one), a size outside them alone; a CSR model's top-d codes: cosine by a sparse product
        (:func:`~mrl.eval.sparse_eval.code_search`, on the GPU when the evaluation runs on one; its time
        kept in :attr:`sparse_searches`). A size is searched again only for more neighbours
        than its search kept, and the deeper search is kept instead. With :attr:`exclude_self` no query
        is among its own neighbours (at most :attr:`candidates` of them)."""
        k = min(int(k), self.candidates)
        ids = self._neighbour_ids.get(d)
        if ids is None or ids.shape[1] < k:
            chunks, own = (self.chunks.query, self.chunks.database), self.exclude_self
            if self.sparse:
                codes = self.database_codes(d)
                ids, measured = code_search(
                    codes, self.queries, d, k, chunks[1], chunks[0], "float32", own, self.device
                )
                self.sparse_searches[d] = measured
                self._neighbour_ids[d] = ids
            elif not self.one_pass:
                use_gpu = None if self.device.type == "cuda" else False  # None: faiss's GPU index if built
                ids = exact_search(self.database, self.queries, d, k, *chunks, use_gpu, exclude_self=own)[1]
                self._neighbour_ids[d] = ids
            else:
                # every reported size at once (their cost is about one full-width search), or d alone
                sizes = self.sizes if d in self.sizes else [d]
                found = search_all_sizes(
                    self.database,
                    self.queries,
                    sizes,
                    k,
                    self.device,
                    exclude_self=own,
                    max_query_rows=chunks[0],
                    max_db_rows=chunks[1],
                )
                for size, (_, size_ids) in found.items():
                    kept = self._neighbour_ids.get(size)
                    if kept is None or kept.shape[1] < size_ids.shape[1]:
                        self._neighbour_ids[size] = size_ids
            ids = self._neighbour_ids[d]
        return ids[:, :k]


def same_items(
    database: tuple[np.ndarray, np.ndarray], queries: tuple[np.ndarray, np.ndarray], same_split: bool
) -> bool:
    """Whether the queries are the database's own items, query ``i`` database row ``i``: the same split,
    or two splits whose exported embeddings and labels are identical (one data set under two names, as
    an image folder without a test folder evaluates its validation images as ``test``). Compared a
    chunk of at most ``CHUNK_BYTES`` at a time (the embeddings may be memmaps larger than memory)."""
    if same_split:
        return True
    (db, db_y), (q, q_y) = database, queries
    if db.shape != q.shape or db.dtype != q.dtype or not np.array_equal(db_y, q_y):
        return False
    rows = max(1, CHUNK_BYTES // max(db.itemsize * db.shape[1], 1))
    return all(np.array_equal(db[s : s + rows], q[s : s + rows]) for s in range(0, len(db), rows))
