"""The worker processes that write one split's LitData chunks (in ``mrl-prepare-data``'s writer process,
:mod:`mrl.data.writer_group`).

``litdata.optimize`` would run them, but a command cannot stand behind how it does: Ctrl-C makes it exit
0 (its SIGINT handler), an error raised while a worker writes its last chunk can go unread (the merged
index then lacks that worker's images, or its main process waits forever for the helper processes of the
worker), and it prints an advert and lines per worker. Here each worker writes a contiguous slice of the
items with LitData's own ``BinaryWriter`` (chunks and an index file named by its rank, as optimize's
workers write them with ``keep_data_ordered``) and reports its own outcome; once every worker is done,
LitData merges their indexes into ``index.json``. The chunks are read as optimize's are.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import queue
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from mrl.data.writer_group import count_one, ended

INDEX_NAME = "index.json"


def write_items(
    split_dir: str, inputs: list[Any], encode: Callable[[Any], dict], chunk_bytes: str, workers: int
) -> None:
    """``encode(item)`` of every item written as LitData chunks to ``split_dir`` by ``workers`` forked
    processes, in order; a ``RuntimeError`` naming the first failure (the caller ends the others)."""
    from litdata.streaming.writer import BinaryWriter

    ctx = multiprocessing.get_context("fork")  # encode and the items are inherited, not pickled
    workers = max(1, min(workers, len(inputs)))  # every worker writes at least one chunk and its index
    bounds = [len(inputs) * rank // workers for rank in range(workers + 1)]
    running = {}
    for rank in range(workers):
        report, report_end = ctx.Pipe(duplex=False)
        job = (rank, workers, inputs[bounds[rank] : bounds[rank + 1]], encode, split_dir, chunk_bytes)
        process = ctx.Process(target=_worker, args=(*job, report_end), daemon=False)
        process.start()
        report_end.close()
        running[report] = process
    while running:
        for report in wait(list(running)):
            process = running.pop(report)
            try:
                message = report.recv()
            except EOFError:  # ended without a word: killed
                process.join()
                message = ended("a writer worker", process.exitcode)
            if message is not None:
                raise RuntimeError(message)
            process.join()
    written = sorted(p.name for p in Path(split_dir).glob(f"*.{INDEX_NAME}"))
    if len(written) != workers:  # merge would wait for the missing ones forever
        raise RuntimeError(f"{workers} writer workers finished but wrote {len(written)} index files")
    BinaryWriter(split_dir, chunk_bytes=chunk_bytes).merge(workers)
    stored = sum(
        chunk["chunk_size"] for chunk in json.loads(Path(split_dir, INDEX_NAME).read_text())["chunks"]
    )
    if stored != len(inputs):
        raise RuntimeError(f"the merged index lists {stored} of the {len(inputs)} images")


def _worker(
    rank: int,
    workers: int,
    items: list[Any],
    encode: Callable[[Any], dict],
    split_dir: str,
    chunk_bytes: str,
    report: Any,
) -> None:
    """One worker: its slice of the items into its own chunks and index file; reports None or its error."""
    from litdata.streaming.writer import BinaryWriter

    # LitData names the chunks and the index file by these, as optimize's workers set them
    os.environ["DATA_OPTIMIZER_GLOBAL_RANK"] = str(rank)
    os.environ["DATA_OPTIMIZER_NUM_WORKERS"] = str(workers)
    message = None
    try:
        # a message queue keeps its note of the data format it inferred from being printed
        writer = BinaryWriter(split_dir, chunk_bytes=chunk_bytes, msg_queue=queue.SimpleQueue())
        for index, item in enumerate(items):
            writer.add_item(index, encode(item))
            count_one()
        writer.done()
    except BaseException as err:  # reported to the writer process, which says what failed
        message = f"{type(err).__name__}: {err}"
    with contextlib.suppress(OSError):
        report.send(message)
    os._exit(0 if message is None else 1)  # not multiprocessing's exit: nothing else to wait for
