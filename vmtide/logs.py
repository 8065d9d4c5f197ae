"""Logging for both daemons: one line per event, fit for journald or a terminal."""

from __future__ import annotations

import logging
import os


def setup_logging(level: str) -> None:
    # journald stamps every line itself; a terminal or file needs the time.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, format=stamp + "%(levelname)s %(name)s: %(message)s")
