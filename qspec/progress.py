"""Progress bars with time left (rich), or one plain line per step in quiet mode (CI)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Progress:
    def __init__(self, quiet: bool = False, eta=None):
        self.quiet = quiet
        self.eta = eta  # the whole run's estimate (eta.Eta), or None

    def run_left(self) -> str:
        """'; run ~4 min left' once the run's estimate has a basis, else ''."""
        left = self.eta.left() if self.eta is not None else None
        if left is None:
            return ""
        return f"; run ~{left / 60:.0f} min left" if left >= 90 else f"; run ~{left:.0f}s left"

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
                bar.update(task, description=f"{name}: {description}{self.run_left()}")

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
            left = f", ~{elapsed / done * (total - done):.0f}s left in {name}" if done else ""
            line = f"[{count[0]}/{total}] {name}: {description}{left}{self.run_left()}"
            print(line, file=sys.stderr, flush=True)

        return advance
