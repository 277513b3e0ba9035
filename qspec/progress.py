"""Progress bars with time left (rich), or one plain line per step in quiet mode (CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    @contextmanager
    def task(self, name: str, total: int) -> Iterator[Callable[[str], None]]:
        """Yields advance(description): call it as each of `total` items starts."""
        if self.quiet or not sys.stderr.isatty():
            yield self._plain(name, total)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        columns = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
        ]
        with Bar(*columns, transient=False) as bar:
            task = bar.add_task(name, total=total)
            started = [False]

            def advance(description: str) -> None:
                if started[0]:
                    bar.advance(task)
                started[0] = True
                bar.update(task, description=f"{name}: {description}")

            yield advance
            bar.update(task, completed=total, description=f"{name}: done")

    def _plain(self, name: str, total: int) -> Callable[[str], None]:
        start, count = time.perf_counter(), [0]

        def advance(description: str) -> None:
            count[0] += 1
            if self.quiet:
                return
            done = count[0] - 1
            elapsed = time.perf_counter() - start
            left = f", ~{elapsed / done * (total - done):.0f}s left" if done else ""
            print(f"[{count[0]}/{total}] {name}: {description}{left}", file=sys.stderr, flush=True)

        return advance
