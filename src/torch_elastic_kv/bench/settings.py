"""The resolved settings of one benchmark run (what the command line asked for, defaults filled in)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

SYSTEM_NAMES = ("elastic", "elastic-noprefix", "static", "hf-generate", "hf-generate-batch")
# what runs when --systems is not given: the prefix trace adds ours without the prefix cache
DEFAULT_SYSTEMS = ("elastic", "static", "hf-generate", "hf-generate-batch")
# --trace mooncake (full, quick): the full replay's 1,750 requests are beyond transformers'
# generate on a small CPU in reasonable time; ask for hf-generate / hf-generate-batch by name
PREFIX_DEFAULT_SYSTEMS = {
    False: ("elastic", "elastic-noprefix", "static"),
    True: ("elastic", "elastic-noprefix", "static", "hf-generate", "hf-generate-batch"),
}


@dataclass(frozen=True)
class BenchSettings:
    """Everything a run depends on; written verbatim into ``results.json``."""

    trace: str  # a name from traces.TRACE_NAMES or a CSV path
    systems: tuple[str, ...]
    model_path: str | None
    config: str
    device: str
    dtype: str
    seed: int
    out: str
    quick: bool
    time_scale: float
    token_scale: float
    window: tuple[float, float | None]
    thin: int
    max_bytes: int | None  # None: sized from the trace (see systems.auto_max_bytes)
    min_bytes: int
    headroom: float
    idle_seconds: float
    tail_seconds: float  # idle time measured after the last request finishes
    max_running: int
    max_batch_tokens: int
    page_tokens: int
    sample_interval_s: float
    threads: int  # torch CPU threads while the benchmark runs
    progress: bool
    block_tokens: int | None = None  # prefix traces: tokens each of the trace's blocks becomes
    prefix_expiry_s: float | None = None  # the prefix cache's expiry (None: the Engine's default)
    preroll_s: float = 0.0  # trace seconds before the window replayed first, left out of the figures

    def to_json(self) -> dict:
        data = asdict(self)
        data["systems"] = list(self.systems)
        data["window"] = list(self.window)
        return data


@dataclass(frozen=True)
class ResolvedArgs:
    """Settings plus the raw trace, read once while validating."""

    settings: BenchSettings
    raw_requests: list
    trace_name: str
    trace_source: str
    attribution: str | None
