"""Evaluation of Matryoshka embeddings: one module per evaluator (see ``mrl-eval``, conf/eval.yaml)."""
