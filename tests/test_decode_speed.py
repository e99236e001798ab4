"""The decode-speed levers keep the Engine exact (issue 25 item 2).

* ``Engine(compile=True)`` (``hf/compile.py``) gives the tokens the eager Engine gives, on the
  suite's architectures, across a grow, a budget cut that preempts (swap and recompute),
  shrinks and compacts, and the grow back, all in the middle of decoding;
* after its warm-up at start, no step compiles again, whatever the batch size: dynamo's
  graph counter stays put across a varied sequence of batch sizes and those elastic events;
* bad values of the new arguments are refused with ValueError, nothing built;
* the step time split (``stats()["step_phase_seconds"]``) accounts for the steps.

Timing itself lives in benchmarks/ (bench_engine.py, RESULTS.md "Decode speed").
"""

from __future__ import annotations

import os

import pytest
import torch
from torch._dynamo.utils import counters

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.testing import ManualClock
from torch_elastic_kv.testing.models import FACTORIES, tiny_llama

MiB = 1 << 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 8 KiB of K/V per token (2 layers x 4 KV heads x head_dim 128 x K and V x 4 bytes): a 2 MiB
# granule holds 256 tokens, so a dozen requests span several granules to grow, give back and
# compact.
GEOMETRY = dict(hidden_size=512, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _workload() -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(25)
    lens = torch.randint(20, 160, (12,), generator=g).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    return prompts, torch.randint(24, 48, (12,), generator=g).tolist()


def _run_elastic(model, compile: bool) -> tuple[list[list[int]], dict, int]:
    """The workload through an Engine whose budget is cut to 40 % of what is live once
    everything decodes, then restored 8 steps later. Returns each request's tokens, the final
    stats (plus ``grows_at_restore``) and how many graphs dynamo compiled after the Engine
    was built."""
    prompts, max_new = _workload()
    clock = ManualClock(100.0)
    policy = ElasticPolicy(min_bytes=0, max_bytes=32 * MiB, idle_seconds=0.5, swap_bytes=2 * MiB, clock=clock)
    eng = Engine(model, policy=policy, max_batch_tokens=256, background=False, prefix_caching=False, compile=compile)
    graphs = _graphs()
    try:
        rids = [eng.add_request(p, n) for p, n in zip(prompts, max_new)]
        cut_at = None
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            clock.t += 0.1
            st = eng.stats()
            if cut_at is None and st["waiting"] == 0 and st["running"] == len(rids) and steps > 3:
                grows = st["grows"]
                eng.set_budget(int(st["live_bytes"] * 0.4))
                cut = eng.stats()
                assert cut["preemptions"] > 0 and cut["resident_bytes"] < st["resident_bytes"], cut
                assert grows > 0  # it grew from nothing to hold them
                cut_at = steps
            elif cut_at is not None and steps == cut_at + 8:
                grows_at_restore = st["grows"]
                eng.set_budget(None)  # the preempted requests come back, memory grows again
        assert cut_at is not None, "the requests never all decoded at once"
        return (
            [eng.output_ids(r) for r in rids],
            {**eng.stats(), "grows_at_restore": grows_at_restore},
            _graphs() - graphs,
        )
    finally:
        eng.close()


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_compiled_engine_gives_the_eager_tokens_across_elastic_events(arch):
    model = FACTORIES[arch](**GEOMETRY)
    eager, _, _ = _run_elastic(model, compile=False)
    compiled, st, new_graphs = _run_elastic(model, compile=True)
    assert compiled == eager
    # the events did happen in the compiled run: grow, preemption (both kinds), shrink,
    # compaction, grow back
    assert st["swap_preemptions"] >= 1 and st["recompute_preemptions"] >= 1, st
    assert st["shrinks"] >= 1 and st["compactions"] >= 1, st
    assert st["grows"] > st["grows_at_restore"], st
    assert st["compiled_modules"] == 2 * 3 + 1 and st["compile_seconds"] > 0
    assert st["prepacked_layers"] == 0
    # nothing compiled after start-up: not the cut, not the preemptions, not the new shapes
    assert new_graphs == 0
    # close() put the modules back on their own forward
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_no_recompilation_after_warm_up_across_batch_sizes():
    model = tiny_llama(**GEOMETRY)
    eng = Engine(model, policy=ElasticPolicy(max_bytes=16 * MiB), max_batch_tokens=64, background=False, compile=True)
    try:
        warm = _graphs()
        assert warm > 0
        g = torch.Generator().manual_seed(3)
        # 1, 3, 2, 7, 5 and 64-token steps, prefill chunks mixed with decodes
        for batch in (1, 3, 2, 7, 5):
            for _ in range(batch):
                n = int(torch.randint(1, 90, (1,), generator=g))
                eng.add_request(torch.randint(3, 256, (n,), generator=g).tolist(), 3)
            while eng.has_unfinished():
                eng.step()
        sizes = {e["num_tokens"] for e in eng.timeline}
        assert len(sizes) >= 6 and 1 in sizes and 64 in sizes, sizes
        assert _graphs() == warm
    finally:
        eng.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compile": "yes"}, "compile must be True or False, got 'yes'"),
        ({"compile": 1}, "compile must be True or False, got 1"),
        ({"compile": True, "prepack_weights": True}, "compile=True and prepack_weights=True exclude each other"),
    ],
)
def test_bad_compile_values_raise_value_error_and_leave_the_model_as_it_was(kwargs, message):
    model = tiny_llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Engine(model, background=False, **kwargs)
    assert model.config._attn_implementation == attn
    assert all(type(m) is not torch.nn.Linear or "forward" not in m.__dict__ for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_step_phase_seconds_account_for_the_steps():
    eng = Engine(tiny_llama(), background=False)
    try:
        eng.generate([[5, 6, 7, 8], [9, 10]], 6)
        st = eng.stats()
        phases = st["step_phase_seconds"]
        assert tuple(phases) == ("schedule", "pack", "forward", "sample", "postprocess", "memory")
        assert all(v >= 0 for v in phases.values())
        assert phases["forward"] > 0 and phases["pack"] > 0 and phases["sample"] > 0
        total = sum(e["step_seconds"] for e in eng.timeline)
        # every phase lies inside a step; the step's own bookkeeping (the timeline) is outside
        assert sum(phases.values()) <= total
        assert phases["forward"] < total
    finally:
        eng.close()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--threads", "0"], "--threads must be >= 1"),
        (["--threads", "two"], "--threads must be an integer"),
        (["--threads", "100000"], "--threads must be at most the"),
        (["--compile=yes"], "--compile/--no-compile: ignored explicit argument 'yes'"),
        (["--no-compile=1"], "--compile/--no-compile: ignored explicit argument '1'"),
    ],
)
def test_bad_serve_flags_exit_2_with_one_line(argv, needle, capsys):
    from torch_elastic_kv.serve import cli

    assert cli.serve_main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ekv-serve: error: "), err
    assert needle in err, err


def test_serve_flags_defaults_and_help(capsys):
    from torch_elastic_kv.serve import cli

    s = cli.resolve(["--port", "0", "--device", "cpu"])
    assert s.compile is False and s.threads == cli.default_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    s = cli.resolve(["--port", "0", "--device", "cpu", "--compile", "--threads", "1"])
    assert s.compile is True and s.threads == 1
    with pytest.raises(SystemExit):
        cli.serve_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threads THREADS" in text and "--compile, --no-compile" in text


def test_server_with_compile_answers_as_the_eager_engine():
    """``serve --compile --threads 1``: compiled at start (logged), and its greedy completions are
    the eager Engine's tokens."""
    import httpx

    from torch_elastic_kv.serve.default_model import EOS_ID, build_default_model, build_default_tokenizer
    from torch_elastic_kv.testing.processes import ServerProcess

    tokenizer = build_default_tokenizer()
    prompts = ["The quick brown fox", "def main():", "1, 2, 3,"]
    eng = Engine(build_default_model(), policy=ElasticPolicy(max_bytes=64 * MiB), background=False)
    try:
        want = eng.generate([tokenizer.encode(p) for p in prompts], 12, eos_token_id=EOS_ID)
    finally:
        eng.close()
    server = ServerProcess(["--compile", "--threads", "1", "--max-kv-bytes", "32M", "--drain-seconds", "2"])
    try:
        body = {"model": "ekv-default-llama", "prompt": prompts, "max_tokens": 12, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [tokenizer.decode(ids, skip_special_tokens=True) for ids in want]
        log = server.log()
        assert "1 thread(s) for the forward (--threads)" in log and "compiled in " in log, log[-2000:]
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_a_failed_compile_raises_and_leaves_the_model_as_it_was(monkeypatch):
    """Inductor failing at start (no C++ compiler, say) fails the constructor with its error and
    puts the model back: its modules on their own forward, its attention as it was."""
    from torch_elastic_kv.hf import compile as hf_compile

    def fail(self, dtype, device):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(hf_compile.CompiledLayers, "warm_up", fail)
    model = tiny_llama()
    attn = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        Engine(model, background=False, compile=True)
    assert model.config._attn_implementation == attn
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
