"""What every evaluator reads: the exported embeddings and labels, the trained head and sizes, where to
compute, chunk sizes, seed, and the report sections of the evaluators that ran before it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from mrl.nn.matryoshka_linear import MatryoshkaLinear


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


@dataclass
class EvalContext:
    """One evaluation's inputs, shared by the evaluators (``mrl.eval.evaluators``)."""

    database: np.ndarray  # (N, D) embeddings of the database split (a read-only memmap)
    db_labels: np.ndarray  # (N,)
    queries: np.ndarray  # (Q, D) embeddings of the query split
    query_labels: np.ndarray  # (Q,)
    head: MatryoshkaLinear  # the trained classifiers, on the CPU
    nesting: list[int]  # the trained sizes
    sizes: list[int]  # the sizes to report (the nesting or sizes=)
    kind: str | None  # the training run's head.kind: mrl, mrl_e, ff, standard
    device: torch.device  # where searches may run (a faiss GPU index on cuda)
    chunks: Chunks
    seed: int
    methods: frozenset[str]  # the methods.<name> that are on
    # report sections of the evaluators that already ran (the kNN stage's 1-NN for the baselines)
    sections: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(
        cls,
        cfg: DictConfig,
        database: tuple[np.ndarray, np.ndarray],
        queries: tuple[np.ndarray, np.ndarray],
        head: MatryoshkaLinear,
        sizes: list[int],
        kind: str | None,
        device: torch.device,
    ) -> EvalContext:
        """The context of an evaluation config (conf/eval.yaml): its chunks, seed and the methods that are
        on, with ``(embeddings, labels)`` of the database and query splits."""
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
            methods=frozenset(name for name, on in cfg.methods.items() if on),
        )

    @property
    def embed_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.num_classes
