"""A minimal progress bar on stderr (no dependency), shown for work longer than a second."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """``with Progress(total, desc) as bar: ... bar.update(n)``; prints only on a TTY or when forced."""

    def __init__(self, total: int, desc: str = "", *, stream=None, force: bool = False, width: int = 28):
        self.total, self.desc, self.width = max(total, 1), desc, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = force or getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self.enabled:
            frac = self.done / self.total
            filled = int(round(self.width * frac))
            elapsed = time.perf_counter() - self.start
            self.stream.write(
                f"\r{self.desc:<28} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * frac:5.1f}% {elapsed:6.1f}s"
            )
            self.stream.flush()

    def __enter__(self) -> Progress:
        self.update(0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def progress(items: Iterable[T], total: int, desc: str = "") -> Iterator[T]:
    """Iterate ``items`` while drawing a bar."""
    with Progress(total, desc) as bar:
        for x in items:
            yield x
            bar.update()
