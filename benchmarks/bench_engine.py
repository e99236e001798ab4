"""Engine benchmark: elastic vs static KV pool vs transformers generate / generate_batch.

One run, one model, one workload, four systems:

* ``engine-elastic``  Engine + ElasticPolicy(min_bytes=0, max_bytes=M): memory follows demand;
* ``engine-static``   Engine + ElasticPolicy(min_bytes=M, max_bytes=M): mapped at start;
* ``hf-generate``     ``model.generate`` on left-padded batches of ``--batch`` requests in
                      arrival order (each batch runs to its longest request; DynamicCache);
* ``hf-generate_batch`` transformers' continuous batching (``init_continuous_batching``
                      manager, the engine behind ``generate_batch``, with each request's own
                      ``max_new_tokens``).

The Engine runs the model's linear layers on oneDNN-prepacked weights (``prepack_weights``,
on by default for float32 on CPU), transformers as users run it. Two more systems split what
that kernel choice buys from what the Engine itself does (both on by default, ``--systems``
picks):

* ``engine-elastic-unpacked``    the elastic Engine with ``prepack_weights=False``;
* ``hf-generate_batch-packed``   generate_batch with the same ``PackedLinears`` installed on
                                 the model for its run (the same kernels as the Engine).

Workload: the first ``--requests`` rows of the Azure LLM inference trace 2023, "code" sample
(Azure Public Dataset, CC-BY 4.0; Patel et al., "Splitwise: Efficient generative LLM
inference using phase splitting", ISCA 2024), scaled down for a CPU: prompt length =
ContextTokens / ``--prompt-scale`` (at least 4, at most ``--max-prompt``), output length =
min(GeneratedTokens * ``--output-scale``, ``--max-output``); token ids are random (seeded).
The code trace is prefill-heavy (median 1469 prompt / 13 output tokens); ``--output-scale``
makes it decode-heavier, like chat serving with many concurrent decodes, keeping the trace's
mix of lengths. All requests are
submitted at t=0 (offline), so every system sees the same queue. No EOS: every request
produces exactly its output length.

Metrics: output tokens/s over the whole run (wall clock) and per CPU-second of this process
(user + sys of all its threads: what other work on a shared machine disturbs least); TTFT (first token - submission) and TPOT
((finish - first token) / (tokens - 1)) per request, p50/p99; KV bytes resident: mean
(time-weighted over the run) / peak / idle (after the run plus the policy's idle_seconds).
For hf-generate the KV bytes are the DynamicCache tensor sizes computed from the batch
shapes; for hf-generate_batch the size of its preallocated cache tensor.

Compute floor (issue 25 item 3): the workload's forward FLOPs (every linear layer over every
forwarded token, the LM head over every sampled row, attention's QK and PV over each token's
context) divided by this machine's measured float32 matmul rate (the faster of a 1024^3
``torch.mm`` and the same product through oneDNN's linear, on ``--threads`` threads, median of
repeats), printed beside each Engine's wall time: how far the
Engine alone, without a server, is from what its arithmetic needs. Each Engine's step time
split (``stats()["step_phase_seconds"]``: schedule, pack, forward, sample, postprocess,
memory) is printed too. ``engine-elastic-compiled`` (``Engine(compile=True)``, not run unless
named in ``--systems``) measures compilation; its compile time is reported.

``--decode-loop`` measures the decode loop alone instead (issue 25: where a step's time goes):
``--loop-requests`` requests of ``--loop-prompt`` random tokens decode ``--loop-output`` tokens
each, all queued at once, on the server's default model (``--loop-model default``) or the
26M Llama above (``bench``), for every combination of ``--loop-threads`` and
``--loop-compile``, interleaved over ``--repeats`` rounds after a warm-up round: output
tokens/s, prompt tokens/s (the prefill rate, with ``--loop-output 1``), median step ms and ms
per step by phase, medians over the rounds.

Run: python benchmarks/bench_engine.py [--quick]
     python benchmarks/bench_engine.py --decode-loop --loop-threads 1,2 --loop-compile 0,1
     python benchmarks/bench_engine.py --decode-loop --loop-requests 16 --loop-prompt 235 --loop-output 1
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]

from torch_elastic_kv import ElasticPolicy, Engine  # noqa: E402
from torch_elastic_kv.bench import replay  # noqa: E402
from torch_elastic_kv.bench.stats import percentile, time_weighted_mean  # noqa: E402
from torch_elastic_kv.engine.runner import STEP_PHASES  # noqa: E402
from torch_elastic_kv.hf.prepack import PackedLinears  # noqa: E402

TRACE_CANDIDATES = [
    ROOT.parent / "shared" / "traces" / "azure_llm_2023_code.csv",
    ROOT / "src" / "torch_elastic_kv" / "data" / "azure_llm_2023_code.csv",
]
MiB = 1 << 20


# ----------------------------------------------------------------------------- setup --------
def build_model(seed: int = 0) -> LlamaForCausalLM:
    """A 26M-parameter Llama (6 layers, hidden 512, 8 heads over 4 KV heads, vocab 8192)."""
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def load_workload(
    path: Path,
    n: int,
    prompt_scale: int,
    max_prompt: int,
    max_output: int,
    vocab: int,
    seed: int,
    output_scale: int = 1,
) -> tuple[list[list[int]], list[int]]:
    rows = []
    with open(path) as f:
        for row in csv.DictReader(f):
            rows.append((int(row["ContextTokens"]), int(row["GeneratedTokens"])))
            if len(rows) == n:
                break
    g = torch.Generator().manual_seed(seed)
    prompts, outs = [], []
    for ctx, gen in rows:
        plen = min(max(ctx // prompt_scale, 4), max_prompt)
        prompts.append(torch.randint(3, vocab, (plen,), generator=g).tolist())
        outs.append(max(1, min(gen * output_scale, max_output)))
    return prompts, outs


pct = percentile  # the project's one percentile definition (torch_elastic_kv.bench.stats)


def summarize(
    name: str,
    wall: float,
    cpu: float,
    ntok: int,
    ttft: list[float],
    tpot: list[float],
    kv_mean: float,
    kv_peak: float,
    kv_idle: float,
    extra: dict | None = None,
) -> dict:
    return {
        "system": name,
        "wall_s": wall,
        "cpu_s": cpu,
        "output_tokens": ntok,
        "tokens_per_s": ntok / wall,
        "tokens_per_cpu_s": ntok / max(cpu, 1e-9),
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_ms": 1000 * pct(tpot, 50),
        "tpot_p99_ms": 1000 * pct(tpot, 99),
        "kv_mean_mib": kv_mean / MiB,
        "kv_peak_mib": kv_peak / MiB,
        "kv_idle_mib": kv_idle / MiB,
        **(extra or {}),
    }


# ----------------------------------------------------------------------------- systems ------
def run_engine(
    model,
    prompts,
    outs,
    max_bytes: int,
    static: bool,
    max_batch_tokens: int,
    idle_seconds: float,
    prepack: bool = True,
    compile: bool = False,
) -> dict:
    """One Engine over the workload through the shared replay harness (every request at t=0),
    then ``idle_seconds`` + 0.6 s of idle tail for the grower thread to give memory back."""
    policy = ElasticPolicy(
        min_bytes=max_bytes if static else 0, max_bytes=max_bytes, idle_seconds=idle_seconds, clock=replay.clock
    )
    eng = Engine(
        model,
        policy=policy,
        max_batch_tokens=max_batch_tokens,
        background=True,
        prepack_weights=None if prepack else False,
        compile=compile,
    )
    requests = [replay.ReplayRequest(0.0, p, n) for p, n in zip(prompts, outs)]
    name = "engine-static" if static else "engine-elastic"
    try:
        run = replay.replay_engine(eng, requests, name=name, sample_interval_s=0.05, tail_seconds=idle_seconds + 0.6)
        st = eng.stats()
        step_s = [e["step_seconds"] for e in eng.timeline if e["num_tokens"]]
    finally:
        eng.close()
    lat = replay.latencies(run.records)
    load = [(t, resident) for t, resident, _ in run.samples if t <= run.load_end_s]
    return summarize(
        name,
        run.load_end_s,
        run.load_cpu_s,
        sum(len(r.tokens) for r in run.records),
        lat["ttft"],
        lat["tpot"],
        time_weighted_mean(load, run.load_end_s),  # resident over the load (each sample holds until the next)
        max(resident for _, resident in load),
        run.samples[-1][1],  # after the idle tail
        {
            "steps": st["steps"],
            "grows": st["grows"],
            "shrinks": st["shrinks"],
            "shrink_events": st["shrink_events"],
            "compactions": st["compactions"],
            "preemptions": st["preemptions"],
            "prepacked_layers": st["prepacked_layers"],
            "policy_ms": 1000 * st["policy_seconds"],
            "step_ms_mean": 1000 * statistics.mean(step_s) if step_s else 0.0,
            "phase_s": st["step_phase_seconds"],
            "compile_s": st["compile_seconds"],
        },
    )


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * model.dtype.itemsize


class _StepTimes:
    """A generate() streamer that timestamps each decoding step (first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first = True

    def put(self, value) -> None:
        if self.first:
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf_generate(model, prompts, outs, batch: int) -> dict:
    bpt = kv_bytes_per_token(model)
    c0, t0 = time.process_time(), time.perf_counter()
    ttft, tpot, ntok = [], [], 0
    area, peak, last = 0.0, 0, t0
    for b0 in range(0, len(prompts), batch):
        ps, ns = prompts[b0 : b0 + batch], outs[b0 : b0 + batch]
        width, new = max(map(len, ps)), max(ns)
        ids = torch.zeros(len(ps), width, dtype=torch.long)
        mask = torch.zeros(len(ps), width, dtype=torch.long)
        for r, p in enumerate(ps):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        st = _StepTimes()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, streamer=st)
        end = time.perf_counter()
        for n in ns:
            ntok += n
            ttft.append(st.times[0] - t0)
            if n > 1:
                tpot.append((st.times[n - 1] - st.times[0]) / (n - 1))
        # DynamicCache grows from width to width + new tokens per row over the batch
        kv_start, kv_end = len(ps) * width * bpt, len(ps) * (width + new) * bpt
        area += (kv_start + kv_end) / 2 * (end - start)
        peak = max(peak, kv_end)
        last = end
    cpu = time.process_time() - c0
    return summarize("hf-generate", last - t0, cpu, ntok, ttft, tpot, area / (last - t0), peak, 0, {"batch": batch})


def run_hf_generate_batch(
    model, prompts, outs, max_batch_tokens: int, kv_bytes: int, page_size: int = 16, block_sharing: bool = True
) -> dict:
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gc_ = GenerationConfig(max_new_tokens=max(outs), do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        max_batch_tokens=max_batch_tokens,
        page_size=page_size,
        num_blocks=kv_bytes // (kv_bytes_per_token(model) * page_size),
        allow_block_sharing=block_sharing,
    )
    mgr = model.init_continuous_batching(generation_config=gc_, continuous_batching_config=cb)
    # the same inference mode the Engine runs its forwards in (the loop thread inherits it)
    with torch.inference_mode():
        mgr.start()
    # the loop thread builds its cache before serving; the static Engine maps its pool before
    # the clock starts too
    deadline = time.monotonic() + 30
    while getattr(mgr, "batch_processor", None) is None and time.monotonic() < deadline:
        time.sleep(0.005)
    c0, t0 = time.process_time(), time.perf_counter()
    ids = [mgr.add_request(p, max_new_tokens=n, record_timestamps=True) for p, n in zip(prompts, outs)]
    results = {}
    while len(results) < len(ids):
        r = mgr.get_result(timeout=120)
        if r is None:
            break
        if r.is_finished():
            results[r.request_id] = r
    t1, c1 = time.perf_counter(), time.process_time()
    kv = 0
    try:
        kv = mgr.batch_processor.cache.cache_tensor.numel()
    except AttributeError:
        pass
    mgr.stop(block=True)
    ttft, tpot, ntok = [], [], 0
    for rid in ids:
        r = results[rid]
        n = len(r.generated_tokens)
        ntok += n
        ts = r.timestamps or []
        if ts:
            ttft.append(ts[0] - t0)
            if n > 1:
                tpot.append((ts[-1] - ts[0]) / (n - 1))
    return summarize("hf-generate_batch", t1 - t0, c1 - c0, ntok, ttft, tpot, kv, kv, 0, {"finished": len(results)})


# ----------------------------------------------------------------------------- floor --------
def workload_flops(model, prompts, outs) -> float:
    """Forward FLOPs of the workload as the Engine runs it (no shared prefixes: every prompt
    token and every output token but the last is forwarded once): 2 per weight of the decoder
    layers' linear layers per forwarded token, 2 per LM-head weight per sampled token, and
    attention's QK and PV, 4 * heads * head_dim per layer per token of each token's context."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layer_w = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    head_w = model.lm_head.weight.numel()
    total = 0.0
    for p, n in zip(prompts, outs):
        forwarded = len(p) + n - 1
        contexts = forwarded * (forwarded + 1) / 2  # the token at position i attends over i + 1
        total += 2 * layer_w * forwarded + 2 * head_w * n
        total += 4 * c.num_attention_heads * head_dim * c.num_hidden_layers * contexts
    return total


def matmul_rate(threads: int, size: int = 1024, repeats: int = 7) -> float:
    """This machine's float32 matmul rate in FLOP/s on ``threads`` threads: the faster of a
    ``size``^3 ``torch.mm`` (the BLAS torch links) and the same product through oneDNN's linear
    (what ``PackedLinears`` run), each the median of ``repeats`` timed runs after a warm-up.
    Both, because a BLAS may not use every vector unit a CPU has while oneDNN does (on an AMD
    EPYC with AVX-512, MKL runs its AVX2 code: ``benchmarks/RESULTS.md``); ``torch.mm`` alone
    would understate the rate and so make the floor, the least time the arithmetic needs, too
    long."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        products = [lambda: torch.mm(a, b)]
        if torch.backends.mkldnn.is_available():
            products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
        best = 0.0
        for product in products:
            product()
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                product()
                times.append(time.perf_counter() - t)
            best = max(best, 2 * size**3 / statistics.median(times))
        return best
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- decode loop --
def decode_loop(args: argparse.Namespace) -> None:
    """``--decode-loop``: the Engine's decode loop per (threads, compile), interleaved."""
    from torch_elastic_kv.serve.default_model import build_default_model

    def make_model():
        return build_default_model() if args.loop_model == "default" else build_model()

    threads = [int(x) for x in args.loop_threads.split(",")]
    compiles = [bool(int(x)) for x in args.loop_compile.split(",")]
    engines = {}
    for c in compiles:  # one model per Engine: a compiled Engine changes its model's modules
        t0 = time.perf_counter()
        eng = Engine(
            make_model(), policy=ElasticPolicy(max_bytes=256 * MiB), background=False, timeline=True, compile=c
        )
        engines[c] = eng
        print(f"  Engine(compile={c}) built in {time.perf_counter() - t0:.1f} s", flush=True)
    vocab = engines[compiles[0]].vocab_size
    g = torch.Generator().manual_seed(args.seed)

    def fresh_prompts() -> list[list[int]]:  # new ones each run: no run reuses another's cached prefixes
        return [torch.randint(8, vocab, (args.loop_prompt,), generator=g).tolist() for _ in range(args.loop_requests)]

    prompts = fresh_prompts()
    configs = [(t, c) for t in threads for c in compiles]
    runs: dict[tuple[int, bool], list[dict]] = {k: [] for k in configs}

    def once(t: int, c: bool) -> dict:
        torch.set_num_threads(t)
        eng = engines[c]
        prompts = fresh_prompts()
        before = eng.stats()
        eng.timeline.clear()
        t0 = time.perf_counter()
        eng.generate(prompts, args.loop_output)
        wall = time.perf_counter() - t0
        st = eng.stats()
        steps = st["steps"] - before["steps"]
        step_s = sorted(e["step_seconds"] for e in eng.timeline if e["num_tokens"])
        return {
            "tokens_per_s": (st["tokens_generated"] - before["tokens_generated"]) / wall,
            "prompt_tokens_per_s": len(prompts) * args.loop_prompt / wall,
            "step_ms_median": 1000 * step_s[len(step_s) // 2],
            "phases_ms": {
                k: 1000 * (v - before["step_phase_seconds"][k]) / steps for k, v in st["step_phase_seconds"].items()
            },
        }

    for t, c in configs:
        once(t, c)  # warm-up round: kernels and buckets seen once
    for rep in range(args.repeats):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for t, c in order:
            r = once(t, c)
            runs[(t, c)].append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] threads {t} compile {int(c)}: {r['tokens_per_s']:.0f} tok/s, "
                f"step {r['step_ms_median']:.2f} ms (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    print(
        f"decode loop: {args.loop_requests} requests x {args.loop_output} tokens, prompts of {args.loop_prompt}, "
        f"model {args.loop_model}; medians of {args.repeats} rounds"
    )
    print("| threads | compile | tok/s | prompt tok/s | step ms (median) | " + " | ".join(STEP_PHASES) + " (ms/step) |")
    print("|---|---|---|---|---|" + "---|" * len(STEP_PHASES))
    for (t, c), rs in runs.items():
        med = statistics.median
        phases = [f"{med(r['phases_ms'][k] for r in rs):.3f}" for k in STEP_PHASES]
        print(
            f"| {t} | {'on' if c else 'off'} | {med(r['tokens_per_s'] for r in rs):.0f} | "
            f"{med(r['prompt_tokens_per_s'] for r in rs):.0f} | "
            f"{med(r['step_ms_median'] for r in rs):.2f} | " + " | ".join(phases) + " |"
        )
    model = engines[compiles[0]].model
    flops = workload_flops(model, prompts, [args.loop_output] * len(prompts))
    for t in threads:
        rate = matmul_rate(t)
        best = max(statistics.median(r["tokens_per_s"] for r in runs[(t, c)]) for c in compiles)
        floor = flops / rate
        wall = args.loop_requests * args.loop_output / best
        print(
            f"compute floor, {t} thread(s): {flops / 1e9:.3f} GFLOP / {rate / 1e9:.1f} GFLOP/s = {1000 * floor:.1f} ms; "
            f"the best Engine took {1000 * wall:.0f} ms, {wall / floor:.0f}x the floor"
        )
    for c, eng in engines.items():
        if c:
            print(f"compile time at start: {eng.stats()['compile_seconds']:.1f} s")
        eng.close()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


# ----------------------------------------------------------------------------- main ---------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-scale", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=96)
    ap.add_argument(
        "--output-scale",
        type=int,
        default=1,
        help="output = min(GeneratedTokens * this, --max-output): >1 is decode-heavier",
    )
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--max-kv-mib", type=int, default=96, help="M: the pools' max_bytes in MiB")
    ap.add_argument("--batch", type=int, default=8, help="hf-generate batch size")
    ap.add_argument("--repeats", type=int, default=3, help="runs per system, interleaved (median kept)")
    ap.add_argument("--idle-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gb-page-size", type=int, default=16, help="generate_batch page_size")
    ap.add_argument(
        "--gb-block-sharing",
        type=int,
        default=0,
        choices=(0, 1),
        help="generate_batch allow_block_sharing (prefix caching; prompts here share "
        "no prefixes, so it only costs hashing: off by default)",
    )
    ap.add_argument("--skip-hf", action="store_true", help="engines only")
    ap.add_argument(
        "--systems",
        type=str,
        default=None,
        help="comma-separated subset of engine-elastic,engine-static,engine-elastic-unpacked,"
        "hf-generate,hf-generate_batch,hf-generate_batch-packed, or "
        "engine-static-again (the static Engine twice: an A/A noise check), "
        "engine-elastic-compiled (Engine(compile=True))",
    )
    ap.add_argument("--quick", action="store_true", help="16 requests, 1 repeat (smoke run)")
    ap.add_argument("--decode-loop", action="store_true", help="measure the decode loop alone (see the docstring)")
    ap.add_argument("--loop-model", choices=("default", "bench"), default="default")
    ap.add_argument("--loop-requests", type=int, default=8)
    ap.add_argument("--loop-prompt", type=int, default=60)
    ap.add_argument("--loop-output", type=int, default=200)
    ap.add_argument("--loop-threads", type=str, default="1", help="comma-separated thread counts")
    ap.add_argument("--loop-compile", type=str, default="0", help="comma-separated 0/1: Engine(compile=...)")
    ap.add_argument("--json", type=str, default=None, help="write results here")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.repeats = 16, 1
    if args.decode_loop:
        decode_loop(args)
        return
    torch.set_num_threads(args.threads)
    trace = next((p for p in TRACE_CANDIDATES if p.exists()), None)
    if trace is None:
        sys.exit("azure_llm_2023_code.csv not found in " + ", ".join(map(str, TRACE_CANDIDATES)))
    model = build_model()
    nparams = sum(p.numel() for p in model.parameters())
    prompts, outs = load_workload(
        trace,
        args.requests,
        args.prompt_scale,
        args.max_prompt,
        args.max_output,
        model.config.vocab_size,
        seed=args.seed,
        output_scale=args.output_scale,
    )
    print(
        f"model: Llama {nparams / 1e6:.1f}M params, {args.threads} threads; workload: "
        f"{len(prompts)} requests from {trace.name} (prompt = ContextTokens/{args.prompt_scale}, "
        f"output = min(GeneratedTokens * {args.output_scale}, {args.max_output})): {sum(map(len, prompts))} prompt "
        f"tokens, {sum(outs)} output tokens; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    max_bytes = args.max_kv_mib * MiB

    systems = ["engine-elastic", "engine-static", "engine-elastic-unpacked"] + (
        [] if args.skip_hf else ["hf-generate", "hf-generate_batch", "hf-generate_batch-packed"]
    )
    if args.systems:
        # engine-static-again: the static Engine a second time, an A/A run that shows how far
        # two runs of one system differ on this machine
        extra = ["engine-static-again", "engine-elastic-compiled"]
        systems = [s for s in systems + extra if s in args.systems.split(",")]

    def run_one(name: str) -> dict:
        if name.startswith("engine"):
            r = run_engine(
                model,
                prompts,
                outs,
                max_bytes,
                name.startswith("engine-static"),
                args.max_batch_tokens,
                args.idle_seconds,
                prepack=not name.endswith("-unpacked"),
                compile=name.endswith("-compiled"),
            )
            r["system"] = name
            return r
        model.set_attn_implementation("sdpa")  # transformers' own paths, as users run them
        if name == "hf-generate":
            return run_hf_generate(model, prompts, outs, args.batch)
        packed = PackedLinears(model) if name == "hf-generate_batch-packed" else None
        try:
            r = run_hf_generate_batch(
                model, prompts, outs, args.max_batch_tokens, max_bytes, args.gb_page_size, bool(args.gb_block_sharing)
            )
        finally:
            if packed is not None:
                packed.restore()
        r["system"] = name
        return r

    # repeats interleave the systems (rotating the order) so that noise from other work on
    # the machine hits all of them alike; the median run of each system is reported
    runs: dict[str, list[dict]] = {name: [] for name in systems}
    # an untimed first round: kernels see every shape of the workload once (the first
    # 512-token prefill on a fresh process costs seconds), whichever system comes first
    for name in systems:
        run_one(name)
        print(f"  [warm-up] {name}", flush=True)
    for rep in range(args.repeats):
        order = systems[rep % len(systems) :] + systems[: rep % len(systems)]
        for name in order:
            r = run_one(name)
            runs[name].append(r)
            print(
                f"  [{rep + 1}/{args.repeats}] {name}: {r['tokens_per_s']:.1f} tok/s (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
            gc.collect()
    results = []
    for _name, rs in runs.items():
        med = sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]
        med = dict(
            med,
            all_tokens_per_s=[round(r["tokens_per_s"], 1) for r in rs],
            all_tokens_per_cpu_s=[round(r["tokens_per_cpu_s"], 1) for r in rs],
        )
        # CPU time is what other processes on a shared machine disturb least: take its median too
        med["tokens_per_cpu_s"] = sorted(r["tokens_per_cpu_s"] for r in rs)[len(rs) // 2]
        results.append(med)

    hdr = (
        "system",
        "tok/s",
        "tok/CPU-s",
        "TTFT p50 s",
        "TTFT p99 s",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "KV mean MiB",
        "KV peak MiB",
        "KV idle MiB",
    )
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in results:
        print(
            f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['tokens_per_cpu_s']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
            f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} | {r['kv_mean_mib']:.1f} | "
            f"{r['kv_peak_mib']:.1f} | {r['kv_idle_mib']:.1f} |"
        )
    by = {r["system"]: r for r in results}
    for key, unit in (("tokens_per_s", "tokens/s"), ("tokens_per_cpu_s", "tokens/CPU-s")):
        if "engine-elastic" not in by or "engine-static" not in by:
            break
        ratio = by["engine-elastic"][key] / by["engine-static"][key]
        # each round runs the two back to back: the median of the per-round ratios cancels
        # the machine's slow drifts, which the ratio of two medians does not
        paired = statistics.median(
            e / s_ for e, s_ in zip(by["engine-elastic"]["all_" + key], by["engine-static"]["all_" + key])
        )
        line = f"elastic / static {unit}: {ratio:.3f} (floor 0.97; median of per-round ratios {paired:.3f})"
        if "hf-generate_batch" in by:
            x = by["engine-elastic"][key] / by["hf-generate_batch"][key]
            line += f"; elastic / generate_batch {unit}: {x:.2f} (floor 2.0)"
        print(line)
        if "engine-static-again" in by:
            aa = [a / b for a, b in zip(by["engine-static-again"]["all_" + key], by["engine-static"]["all_" + key])]
            print(
                f"A/A static-again / static {unit}: per-round ratios {min(aa):.3f}-{max(aa):.3f}, "
                f"median {statistics.median(aa):.3f}"
            )
        if key == "tokens_per_s" and "engine-elastic-unpacked" in by and "hf-generate_batch" in by:
            print(
                f"same kernels: elastic-unpacked / generate_batch "
                f"{by['engine-elastic-unpacked'][key] / by['hf-generate_batch'][key]:.2f}"
                + (
                    f", elastic / generate_batch-packed "
                    f"{by['engine-elastic'][key] / by['hf-generate_batch-packed'][key]:.2f}"
                    if "hf-generate_batch-packed" in by
                    else ""
                )
            )
    for r in results:
        if "policy_ms" in r:
            print(
                f"{r['system']}: {r['steps']} steps, {r['policy_ms']:.1f} ms of them on memory work "
                f"(budget, grow, shrink: {100 * r['policy_ms'] / 1000 / r['wall_s']:.2f} % of the run)"
            )
    flops = workload_flops(model, prompts, outs)
    rate = matmul_rate(args.threads)
    floor = flops / rate
    print(
        f"compute floor: {flops / 1e9:.2f} GFLOP of forward / {rate / 1e9:.1f} GFLOP/s (float32 1024^3 matmul, best of BLAS and oneDNN, "
        f"{args.threads} threads) = {floor:.3f} s"
    )
    for r in results:
        r["floor_s"] = floor
        if "phase_s" in r:
            r["x_floor"] = r["wall_s"] / floor
            per_step = {k: f"{1000 * v / max(r['steps'], 1):.2f}" for k, v in r["phase_s"].items()}
            compiled = f"; compiled in {r['compile_s']:.1f} s" if r.get("compile_s") else ""
            print(
                f"{r['system']}: {r['wall_s']:.2f} s = {r['x_floor']:.1f}x the floor; ms per step by phase "
                + ", ".join(f"{k} {v}" for k, v in per_step.items())
                + compiled
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
