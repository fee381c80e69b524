"""Progress for long stages: a bar on an interactive terminal, milestone lines in a rule's log."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

log = logging.getLogger("pipeline")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def progress(items: Iterable[T], total: int | None, desc: str, milestones: int = 10) -> Iterator[T]:
    """Iterate `items`, showing a tqdm bar when stderr is a terminal, else logging about
    `milestones` lines (with rate and elapsed time) so a rule's log shows how far it got."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc)
        return
    every = max(1, (total or milestones) // milestones)
    start = time.perf_counter()
    count = 0
    for count, item in enumerate(items, 1):
        yield item
        if count % every == 0 or count == total:
            elapsed = time.perf_counter() - start
            of_total = f"/{total}" if total else ""
            log.info("%s: %d%s (%.1f/s, %.0fs elapsed)", desc, count, of_total, count / max(elapsed, 1e-9), elapsed)
