"""Console hygiene for the commands: each log line once, and no third-party chatter at INFO level."""

from __future__ import annotations

import logging

# faiss announces at INFO level which CPU build it loaded (and which it could not), on every start.
QUIET_LOGGERS = ("faiss.loader",)


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
    * faiss's loader (see :data:`QUIET_LOGGERS`).
    """
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
