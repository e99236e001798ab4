"""What a benchmark watches while it loads servers: their ``/metrics`` and their memory.

``parse_metrics`` reads a Prometheus text page (``prometheus_client.parser``) into the ``ekv_*``
samples by name; ``LoadSampler`` polls each server every ``interval`` seconds on a thread and
records, per tick, its metrics and (given its pid) the memory of its process tree from /proc.
A tick that cannot read a server's page records ``None`` for it and counts a miss: what a miss
means for a figure (repeat the last point, or leave a gap) is the benchmark's choice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any, Optional

from .proc import tree_memory

__all__ = ["LoadSampler", "parse_metrics"]


def parse_metrics(text: str, prefix: str = "ekv_") -> dict[str, float]:
    """The samples of a Prometheus text page whose names start with ``prefix``, by sample name
    (counters keep ``_total``).

    Labelled samples of one name are summed; histograms keep only their ``_sum`` and ``_count``
    (``_bucket`` and ``_created`` samples are left out). ValueError on a page that does not parse.
    """
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if not name.startswith(prefix) or name.endswith(("_bucket", "_created")):
                continue
            out[name] = out.get(name, 0.0) + float(sample.value)
    return out


class LoadSampler:
    """Every ``interval`` s on a thread, for each named server: its ``/metrics`` and its memory.

    Args:
        urls: name -> base URL of a server whose ``/metrics`` is read (``parse_metrics``).
        interval: seconds between ticks (a tick that takes longer starts the next at once).
        t0: ``time.perf_counter()`` value the ticks' times are relative to (default: now).
        pids: name -> pid whose process tree's memory (``tree_memory``) is read each tick; a
            name may be in ``pids`` only (a server without ``/metrics``).
        timeout: seconds one ``/metrics`` read may take.

    ``ticks``: ``{"t": seconds since t0, name: {"metrics": dict | None, "memory": dict | None}}``
    per tick; ``missed``: metrics reads that failed; ``last_metrics``: name -> the last page read.
    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(
        self,
        urls: Mapping[str, str],
        interval: float,
        t0: Optional[float] = None,
        pids: Optional[Mapping[str, int]] = None,
        timeout: float = 5.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"LoadSampler: interval must be > 0 seconds, got {interval!r}")
        import httpx

        self.urls, self.pids = dict(urls), dict(pids or {})
        self.interval = float(interval)
        self.t0 = time.perf_counter() if t0 is None else t0
        self.ticks: list[dict[str, Any]] = []
        self.missed = 0
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._client = httpx.Client(timeout=timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-sampler", daemon=True)

    def read(self, url: str) -> dict[str, float]:
        """One ``/metrics`` page of the server at ``url``, parsed."""
        page = self._client.get(url + "/metrics")
        page.raise_for_status()
        return parse_metrics(page.text)

    def _run(self) -> None:
        names = list(dict.fromkeys([*self.urls, *self.pids]))
        while not self._stop.is_set():
            tick: dict[str, Any] = {"t": time.perf_counter() - self.t0}
            for name in names:
                entry: dict[str, Any] = {"metrics": None, "memory": None}
                if name in self.pids:
                    entry["memory"] = tree_memory(self.pids[name])
                if name in self.urls:
                    try:
                        entry["metrics"] = self.last_metrics[name] = self.read(self.urls[name])
                    except Exception:  # a busy server's slow or bad answer: counted, the tick goes on
                        self.missed += 1
                tick[name] = entry
            self.ticks.append(tick)
            self._stop.wait(self.interval)

    def series(self, name: str, key: str, source: str = "metrics") -> list[tuple[float, float]]:
        """``(t, value)`` of one sample (``source="metrics"``) or /proc field (``"memory"``) of
        server ``name``, from the ticks that read it."""
        out = []
        for tick in self.ticks:
            data = tick.get(name, {}).get(source)
            if data is not None and key in data:
                out.append((tick["t"], data[key]))
        return out

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (after its current tick) and close the HTTP client; idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._client.close()

    def __enter__(self) -> LoadSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
