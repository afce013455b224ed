"""One logger (``ldae_bids``) with a rich handler on stderr, plus a log file per run."""

from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(verbose: int = 0, logfile: Path | None = None) -> logging.Logger:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.WARNING if verbose < 0 else logging.INFO if verbose < 2 else logging.DEBUG
    log = logging.getLogger("ldae_bids")
    log.setLevel(logging.DEBUG)
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = RichHandler(console=Console(stderr=True), show_path=verbose >= 2, rich_tracebacks=False,
                          markup=False, log_time_format="[%X]")
    handler.setLevel(level)
    log.addHandler(handler)
    if logfile is not None:
        logfile.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logfile)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        fh.setLevel(logging.DEBUG)
        log.addHandler(fh)
    log.propagate = False
    return log
