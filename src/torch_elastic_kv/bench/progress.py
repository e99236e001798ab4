"""The progress bar shown while a benchmark runs (tqdm on stderr, off when asked)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """Counts output tokens of every system; one bar for the whole run."""

    def __init__(self, total_tokens: int, enabled: bool = True) -> None:
        self._bar = tqdm(
            total=total_tokens,
            unit="tok",
            file=sys.stderr,
            disable=not enabled,
            dynamic_ncols=True,
            leave=False,
        )

    def system(self, name: str) -> None:
        """Name the system now running."""
        self._bar.set_description(name)

    def tokens(self, count: int) -> None:
        """Add ``count`` produced output tokens."""
        if count:
            self._bar.update(count)

    def close(self) -> None:
        self._bar.close()
