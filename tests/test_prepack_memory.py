"""PackedLinears' memory: resident memory must not grow with the number of batch sizes seen.

oneDNN JIT-compiles one primitive per input shape and keeps it in two caches (about 0.55 MiB
each, 1024 entries per cache), so a packed layer fed every row count a continuous-batching
step has kept growing: a new row count was a new primitive, and once the caches were full
each miss freed one and built another, fragmenting the heap. ``PackedLinears`` pads the rows
up to a few buckets (``padded_rows``); these tests hold it to that.

The two memory tests run in a fresh process (this file run as a script): a fresh heap and
empty oneDNN caches, nothing left by the other tests of the session (whose primitives sit in
the same process-wide caches and whose frees shape the same heap). Resident memory is
VmRSS less RssShmem: the KV pool's granules are memfd pages, resident while mapped, and the
elastic pool maps and gives them back as the load changes; that is the pool's business
(tests/test_engine.py), not the heap's. One torch thread, no background thread: every
allocation is the main thread's, so no other malloc arena takes part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from torch_elastic_kv.hf.prepack import PackedLinears, padded_rows, prepack_available

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not prepack_available(), reason="no oneDNN linear in this torch build"),
]

GROWTH_LIMIT_MIB = 16


def _rss_mib() -> float:
    """VmRSS less RssShmem (memfd KV granules) of this process, in MiB."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssShmem"):
                fields[key] = int(rest.split()[0])
    return (fields["VmRSS"] - fields.get("RssShmem", 0)) / 1024


def _in_fresh_process(what: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- row buckets ---
def test_padded_rows_are_few_and_pad_by_at_most_a_quarter():
    assert [padded_rows(r) for r in range(0, 18)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14, 16, 16, 20]
    buckets = {padded_rows(r) for r in range(1, 2049)}
    assert len(buckets) == 40 and max(buckets) == 2048
    for r in range(1, 20000):
        p = padded_rows(r)
        assert r <= p < 1.25 * r or p == r
        assert padded_rows(p) == p


def test_the_packed_op_sees_only_the_buckets(monkeypatch):
    calls: list[int] = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting(x, *args):
        calls.append(x.numel() // x.shape[-1])
        return real(x, *args)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
    PackedLinears(net)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting)
    with torch.inference_mode():
        for rows in range(1, 2049):
            net(torch.randn(1, rows, 16))
    assert len(calls) == 2 * 2048
    assert set(calls) == {padded_rows(r) for r in range(1, 2049)}  # 40 row counts


@pytest.mark.parametrize(
    "shape", [(9, 64), (3, 3, 64), (2, 33, 64), (65, 64), (257, 64), (1000, 64), (64,), (1, 0, 64)]
)
def test_padding_rows_change_nothing_in_the_real_rows(shape):
    """The packed result is the packed op's on the padded input whatever the padding rows
    hold (bit for bit), and F.linear's to float32 rounding."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(*shape)
    with torch.inference_mode():
        ref = F.linear(x, layer.weight, layer.bias)
        with PackedLinears(layer):
            raw = layer._ekv_packed_linear.packed
            out = layer(x)
            rows = x.numel() // 64
            garbage = torch.full((padded_rows(rows), 64), 1e30)
            garbage[:rows] = x.reshape(rows, 64)
            direct = torch.ops.mkldnn._linear_pointwise(garbage, raw, layer.bias, "none", [], "")
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.reshape(rows, 48), direct[:rows])


def test_non_contiguous_input_rows_are_padded_too():
    layer = torch.nn.Linear(32, 48)
    x = torch.randn(2, 32, 9).transpose(1, 2)  # [2, 9, 32], 18 rows -> 20
    with torch.inference_mode():
        ref = layer(x)
        with PackedLinears(layer):
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- resident memory
def _child_layers() -> dict:
    """Two packed layers over every row count 1..1024, twice: resident MiB at each stage."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 64))
    PackedLinears(net)
    out = {"start": _rss_mib()}
    with torch.inference_mode():
        for stage in ("first", "second"):
            for rows in range(1, 1025):
                net(torch.randn(rows, 64))
            out[stage] = _rss_mib()
    return out


def test_packed_layers_over_a_thousand_row_counts_stop_growing():
    """Before the buckets the first pass alone took ~750 MiB (2 x 1024 primitives and the
    heap their evictions fragmented)."""
    r = _in_fresh_process("layers")
    assert r["first"] - r["start"] < 64, r  # 2 weight shapes x 32 buckets, ~35 MiB
    assert r["second"] - r["first"] < GROWTH_LIMIT_MIB, r


def _child_engine() -> dict:
    """A tiny Engine with default settings: a warm-up, then 600 requests of varied lengths."""
    from torch_elastic_kv import ElasticPolicy, Engine
    from torch_elastic_kv.testing.models import tiny_llama

    torch.set_num_threads(1)
    model = tiny_llama()
    eng = Engine(model, policy=ElasticPolicy(max_bytes=32 << 20), background=False)
    g = torch.Generator().manual_seed(0)
    rows: set[int] = set()

    def serve(requests: list[tuple[int, int]], per_step: int) -> None:
        """Add ``per_step`` requests before each step until all are in; step until done."""
        i = 0
        while i < len(requests) or eng.has_unfinished():
            for plen, new in requests[i : i + per_step]:
                eng.add_request(torch.randint(3, 256, (plen,), generator=g).tolist(), new)
            i += per_step
            eng.step()
            rows.add(eng.timeline[-1]["num_tokens"])

    # warm-up: once through every row bucket a step can have (max_batch_tokens 2048), as a
    # server's first busy minutes would: b one-token prompts are b rows through every layer
    # and the lm_head; above 512, four prompts of b/4 tokens (positions stop at 1024)
    for b in sorted({padded_rows(r) for r in range(1, 2049)}):
        serve([(1, 2)] * b if b <= 512 else [(b // 4, 1)] * 4, per_step=b)
    serve([(int(torch.randint(1, 200, (1,), generator=g)), 4) for _ in range(20)], per_step=3)
    warm, warm_rows = _rss_mib(), len(rows)
    # then traffic: prompts of 1-200 tokens, 1-16 new tokens, 0-5 arrivals a step
    for _ in range(20):
        burst = [
            (int(torch.randint(1, 201, (1,), generator=g)), int(torch.randint(1, 17, (1,), generator=g)))
            for _ in range(30)
        ]
        serve(burst, per_step=int(torch.randint(1, 6, (1,), generator=g)))
    out = {
        "prepacked_layers": eng.stats()["prepacked_layers"],
        "warm": warm,
        "end": _rss_mib(),
        "warm_rows": warm_rows,
        "rows": len(rows),
        "finished": eng.stats()["finished"],
    }
    eng.close()
    return out


def test_an_engine_with_default_settings_does_not_grow_with_batch_sizes():
    """Before the buckets: +456 MiB over the 600 requests (each new step row count a new
    primitive for each of the 4 distinct body weight shapes)."""
    r = _in_fresh_process("engine")
    assert r["prepacked_layers"] == 15, r  # the default packs the float32 CPU model
    assert r["finished"] >= 600 and r["rows"] - r["warm_rows"] > 100, r  # new batch sizes
    assert r["end"] - r["warm"] < GROWTH_LIMIT_MIB, r


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    result = {"layers": _child_layers, "engine": _child_engine}[sys.argv[1]]()
    sys.stdout.write(json.dumps(result) + "\n")
