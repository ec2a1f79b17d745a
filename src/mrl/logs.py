"""Console hygiene for the commands: each log line once, and no third-party chatter at INFO level."""

from __future__ import annotations

import logging
import warnings

# faiss announces at INFO level which CPU build it loaded (and which it could not), on every start;
# boto3 where it found the credentials and the endpoint, for every client
QUIET_LOGGERS = ("faiss.loader", "botocore.credentials", "botocore.configprovider")


# Warnings a user of mrl cannot act on, by the start of their message and the package that raises them:
# they concern the libraries' own calls or mrl's deliberate choices, not the user's settings.
QUIET_WARNINGS = (
    # torchdata's StatefulDataLoader calls a deprecated torch function on every loader it builds
    ("'set_vital' is deprecated", "torchdata"),
    # Lightning's own pytree helper uses a deprecated torch check on every batch transfer
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "lightning"),
    # LitData's streaming datasets know their length per process; mrl shards them for its workers itself
    (r"Your `IterableDataset` has `__len__` defined", "lightning"),
    # resume= continues a run in its own directory, whose checkpoints are expected to be there
    (r"Checkpoint directory .* exists and is not empty", "lightning"),
)


def quiet_warnings() -> None:
    """Ignore :data:`QUIET_WARNINGS` (idempotent: ``warnings`` drops duplicate filters)."""
    for message, package in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=rf"{package}(\.|$)")


class DropMessages(logging.Filter):
    """Drops records whose message contains any of ``fragments`` (adverts, not information)."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party_logs() -> None:
    """Called by the commands once Hydra has configured logging (idempotent).

    * Lightning's package adds its own console handler to the ``lightning`` logger at import, and its
      records also reach the root logger, which Hydra gives a console (and job log file) handler: every
      Lightning line was printed twice. Where the root logger has handlers, Lightning's own are removed,
      as Lightning itself does for its subpackages.
    * Lightning's trainer advertises the litlogger package at INFO level on every run.
    * faiss's loader and boto3's lookups (see :data:`QUIET_LOGGERS`), and the warnings of
      :data:`QUIET_WARNINGS`.
    """
    quiet_warnings()
    import lightning  # noqa: F401  (its import adds the handler removed below)

    root = logging.getLogger()
    lightning_logger = logging.getLogger("lightning")
    if root.handlers:
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(DropMessages("litlogger"))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
