"""Where the server's time goes under bench_serve's closed loop: the server against the Engine alone.

The load is ``bench_serve.py --closed-clients N --closed-per-client M``'s (the same Azure-code
schedule, prompts and greedy streamed ``/v1/completions``), run two ways, alternating
``--rounds`` times in one invocation:

* ``server``  ``python -m torch_elastic_kv serve`` on the default model (``--max-kv-bytes``,
              ``--min-kv-bytes``, ``--idle-seconds 3`` as bench_serve's), warmed up and left idle
              ``--settle`` seconds as bench_serve does, N clients in this process through
              ``openai.AsyncOpenAI``;
* ``engine``  the same requests on an ``Engine`` in this process, no HTTP: each of N "clients"
              adds its next request when its last one finishes, as the closed loop does.

Per run: output tok/s, Engine steps and output tokens per step, the Engine's
``step_phase_seconds`` (server: from ``GET /admin/stats``), and for the server TTFT / TPOT p50
as bench_serve counts them, the mean TTFT the server itself saw (submission to first token,
``vllm:time_to_first_token_seconds``) and the CPU milliseconds per output token of its HTTP
front (the front process; with ``--front thread`` the main thread, the event loop's) and of all
its other threads (the engine thread's forward and the rest). ``--py-spy PATH`` also records the server's threads under the load
(``py-spy record --threads -r 200 -f raw``, non-blocking) into PATH.

Run:
    python benchmarks/profile_serve.py [--rounds 3] [--clients 8] [--per-client 16] [--py-spy prof.txt]
        [--variant NAME=OPTIONS ...] [--no-engine] [--sequential N]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_serve as bs  # noqa: E402  (this directory, put on the path above)


def workload(model_dir: Path, seed: int) -> tuple[list[Any], list[str]]:
    """bench_serve's default Azure-code schedule and its prompts for ``model_dir``'s tokenizer."""
    from torch_elastic_kv.bench.traces import bundled_trace_path, read_trace_csv

    schedule, _ = bs.build_schedule(
        read_trace_csv(bundled_trace_path("azure-code")),
        time_scale=1 / 150,
        prompt_scale=1 / 16,
        output_scale=1.0,
        thin=20,
        window=(0.0, None),
        max_prompt=512,
        max_output=128,
    )
    return schedule, bs.make_prompts(model_dir, schedule, seed)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the HTTP front ("loop") and of the server's other threads
    ("other": the engine thread's forward and the rest). The front is the front process, all
    its threads (``--front process``, the default), or else the server's main thread."""
    from torch_elastic_kv.testing.proc import cpu_seconds
    from torch_elastic_kv.testing.processes import front_pids

    out = {"loop": 0.0, "other": 0.0}
    fronts = front_pids(pid)
    for front in fronts:
        try:
            out["loop"] += cpu_seconds(front)
        except OSError:
            continue  # it ended meanwhile
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds = cpu_seconds(pid, int(tid))
        except OSError:
            continue  # the thread ended meanwhile
        out["loop" if not fronts and int(tid) == pid else "other"] += seconds
    return out


def _metric(text: str, name: str) -> Optional[float]:
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


async def run_server(args, model_dir: Path, schedule, prompts, extra: tuple[str, ...] = ()) -> dict:
    """One closed-loop run against a fresh server (``extra``: more serve options, and ``VAR=value``
    environment variables for it); its figures."""
    import httpx

    from torch_elastic_kv.bench.stats import percentile
    from torch_elastic_kv.testing.processes import ServerProcess

    admin = secrets.token_hex(8)
    env = dict(item.split("=", 1) for item in extra if "=" in item and not item.startswith("-"))
    extra = tuple(item for item in extra if not ("=" in item and not item.startswith("-")))
    argv = [
        "--model", str(model_dir), "--host", "127.0.0.1", "--max-kv-bytes", str(args.max_kv_bytes),
        "--min-kv-bytes", str(args.min_kv_bytes), "--idle-seconds", "3", "--device", "cpu", "--dtype", "float32",
        "--admin-key", admin, *extra,
    ]  # fmt: skip
    server = ServerProcess(argv, env={**bs.SERVER_ENV, **env}, wait=False)
    spy = None
    try:
        base = await asyncio.to_thread(server.wait_ready, 300)
        name = await bs.model_id(base, str(model_dir))
        await bs.warm_up(base, name, prompts[0][:64] or "hello")
        await asyncio.sleep(args.settle)
        headers = {"Authorization": f"Bearer {admin}"}
        async with httpx.AsyncClient(timeout=30) as http:
            before = (await http.get(f"{base}/admin/stats", headers=headers)).json()
            metrics0 = (await http.get(f"{base}/metrics")).text
            if args.py_spy:
                spy = subprocess.Popen(
                    [args.py_spy_exe, "record", "--threads", "--nonblocking", "-r", "200", "-f", "raw"]
                    + ["--pid", str(server.pid), "-o", str(args.py_spy)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await asyncio.sleep(1.0)  # py-spy attaches
            sequential = []  # one-token requests one after another: what a request costs the server
            for k in range(args.sequential):
                body = {"model": name, "prompt": f"request {k} " * 8, "max_tokens": 1, "temperature": 0}
                t_req = time.perf_counter()
                r = await http.post(f"{base}/v1/completions", json=body)
                sequential.append(time.perf_counter() - t_req)
                r.raise_for_status()
            cpu0, load = thread_cpu_seconds(server.pid), os.getloadavg()[0]
            t0 = time.monotonic()
            records, _ = await bs.closed_loop(base, name, schedule, prompts, args.clients, args.per_client, 600, 300)
            wall = time.monotonic() - t0
            cpu1 = thread_cpu_seconds(server.pid)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            after = (await http.get(f"{base}/admin/stats", headers=headers)).json()
            metrics1 = (await http.get(f"{base}/metrics")).text
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        server.stop()
    failed = [r for r in records if r.get("error")]
    if failed:
        raise RuntimeError(f"{len(failed)} request(s) failed, the first: {failed[0]['error']}")
    figures = [bs.request_figures(r) for r in records]
    tokens = sum(r["output_tokens"] for r in records)
    ttft_n = _metric(metrics1, "vllm:time_to_first_token_seconds_count") - _metric(
        metrics0, "vllm:time_to_first_token_seconds_count"
    )
    ttft_s = _metric(metrics1, "vllm:time_to_first_token_seconds_sum") - _metric(
        metrics0, "vllm:time_to_first_token_seconds_sum"
    )
    return {
        "tok_s": tokens / wall,
        "steps": after["steps"] - before["steps"],
        "tokens": tokens,
        "phases": {k: v - before["step_phase_seconds"].get(k, 0.0) for k, v in after["step_phase_seconds"].items()},
        "ttft_p50_ms": 1e3 * percentile([f["ttft_s"] for f in figures if f["ttft_s"] is not None], 50),
        "tpot_p50_ms": 1e3 * percentile([f["tpot_s"] for f in figures if f["tpot_s"] is not None], 50),
        "client_ttft_mean_ms": 1e3 * statistics.mean(f["ttft_s"] for f in figures if f["ttft_s"] is not None),
        "server_ttft_mean_ms": 1e3 * ttft_s / ttft_n if ttft_n else None,
        "cpu_ms_per_token": {k: 1e3 * (cpu1[k] - cpu0[k]) / tokens for k in cpu1},
        "wall_s": wall,
        "load": load,
        "sequential_ms": 1e3 * statistics.median(sequential) if sequential else None,
        "texts": [r["text_sha1"] for r in records],
    }


def run_engine(args, model_dir: Path, schedule, prompts) -> dict:
    """The same closed loop on an Engine in this process (the server's Engine options)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch_elastic_kv.engine.engine import Engine
    from torch_elastic_kv.engine.policy import ElasticPolicy
    from torch_elastic_kv.serve.cli import default_threads

    torch.set_num_threads(default_threads())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = Engine(
        model,
        policy=ElasticPolicy(min_bytes=args.min_kv_bytes, max_bytes=args.max_kv_bytes),
        timeline=False,
        keep_finished=1024,
    )
    total = args.clients * args.per_client
    ids = [tok(prompts[k % len(schedule)])["input_ids"] for k in range(total)]
    try:
        warm = engine.add_request(ids[0][:16], 4)  # a warm-up, as the server's
        while engine.request_info(warm)["finish_reason"] is None:
            engine.step()
        before = engine.stats()
        owner: dict[int, int] = {}
        sent = dict.fromkeys(range(args.clients), 0)  # requests each client has sent

        def send(client: int) -> None:
            k = client + args.clients * sent[client]
            if k < total:
                sent[client] += 1
                rid = engine.add_request(ids[k], schedule[k % len(schedule)].max_tokens)
                owner[rid] = client

        load, t0 = os.getloadavg()[0], time.perf_counter()
        for c in range(args.clients):
            send(c)
        tokens = 0
        while owner:
            for rid, _token, reason in engine.step():
                tokens += 1
                if reason is not None:
                    send(owner.pop(rid))
        wall = time.perf_counter() - t0
        after = engine.stats()
    finally:
        engine.close()
    return {
        "tok_s": tokens / wall,
        "steps": after["steps"] - before["steps"],
        "tokens": tokens,
        "phases": {k: v - before["step_phase_seconds"].get(k, 0.0) for k, v in after["step_phase_seconds"].items()},
        "wall_s": wall,
        "load": load,
    }


def _line(mode: str, r: dict) -> str:
    per_step = ", ".join(f"{k} {1e3 * v / max(1, r['steps']):.2f}" for k, v in r["phases"].items())
    text = (
        f"{mode:6s} {r['tok_s']:7.0f} tok/s  {r['steps']} steps, {r['tokens'] / max(1, r['steps']):.2f} tokens/step; "
        f"ms per step: {per_step}; load {r['load']:.2f}"
    )
    if mode != "engine":
        cpu = r["cpu_ms_per_token"]
        text += (
            f"\n        TTFT p50 {r['ttft_p50_ms']:.1f} ms (mean {r['client_ttft_mean_ms']:.1f}, server-side "
            f"{r['server_ttft_mean_ms']:.1f}), TPOT p50 {r['tpot_p50_ms']:.2f} ms; CPU ms per output token: "
            f"HTTP front {cpu['loop']:.3f}, other threads {cpu['other']:.3f}"
        )
        if r.get("sequential_ms") is not None:
            text += f"; one-token request alone {r['sequential_ms']:.2f} ms (median)"
    return text


def parse_args(argv=None):
    p = bs._OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=bs._positive_int, default=3, help="server and engine runs each (default 3)")
    p.add_argument("--clients", type=bs._positive_int, default=8)
    p.add_argument("--per-client", type=bs._positive_int, default=16)
    p.add_argument("--max-kv-bytes", type=bs.parse_bytes, default=bs.parse_bytes("64M"))
    p.add_argument(
        "--min-kv-bytes", type=bs.parse_bytes, default=0, help="the server's floor (default 0; = max: a static pool)"
    )
    p.add_argument("--model", type=Path, help="local HF model directory (default: the package's default model)")
    p.add_argument("--py-spy", type=Path, help="record the server's threads with py-spy into this file (first round)")
    p.add_argument(
        "--settle",
        type=bs._non_negative,
        default=6.0,
        help="seconds between the warm-up and the load (default 6: bench_serve's idle-seconds + 1 + baseline)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every run's figures here")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="also run the server with these serve options (e.g. 'h11=--http h11 --loop asyncio'; a VAR=value "
        "sets an environment variable of that server), in each round beside the plain server and the Engine; "
        "repeatable",
    )
    p.add_argument("--no-engine", action="store_true", help="leave out the Engine-alone runs")
    p.add_argument(
        "--sequential",
        type=int,
        default=0,
        help="before each server's closed loop, time this many one-token completions sent one after another "
        "(the median is reported: a request's cost in the server with nothing else running; default 0: none)",
    )
    args = p.parse_args(argv)
    variants = {}
    for text in args.variant:
        name, sep, options = text.partition("=")
        if not sep or not name or name in ("server", "engine") or name in variants:
            p.error(f"--variant: expected a new NAME=OPTIONS (not server or engine), got {text!r}")
        variants[name] = tuple(options.split())
    args.variants = variants
    if args.sequential < 0:
        p.error(f"--sequential must be >= 0, got {args.sequential}")
    if args.min_kv_bytes > args.max_kv_bytes:
        p.error(f"--min-kv-bytes ({args.min_kv_bytes}) is above --max-kv-bytes ({args.max_kv_bytes})")
    args.py_spy_exe = None
    if args.py_spy is not None:
        args.py_spy_exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(args.py_spy_exe).exists():
            p.error("--py-spy: no py-spy executable on PATH or beside this python")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from torch_elastic_kv.serve.default_model import write_default_model_dir

            model_dir = write_default_model_dir(Path(tmp) / "model")
        schedule, prompts = workload(Path(model_dir), args.seed)
        modes = ["server", *args.variants, *(() if args.no_engine else ("engine",))]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        spy = args.py_spy
        for i in range(args.rounds):
            for mode in modes if i % 2 == 0 else modes[::-1]:
                if mode == "engine":
                    r = run_engine(args, Path(model_dir), schedule, prompts)
                else:
                    extra = args.variants.get(mode, ())
                    r = asyncio.run(run_server(args, Path(model_dir), schedule, prompts, extra))
                    args.py_spy = None  # one profile is enough
                runs[mode].append(r)
                print(f"round {i + 1}: {_line(mode, r)}", flush=True)
        args.py_spy = spy
    texts = {tuple(r["texts"]) for m, rs in runs.items() if m != "engine" for r in rs}
    print(f"server texts equal across rounds and variants: {len(texts) == 1}")
    med = {m: statistics.median(r["tok_s"] for r in rs) for m, rs in runs.items()}
    line = ", ".join(f"{m} {v:.0f} tok/s" for m, v in med.items())
    if "engine" in med:
        line += f" (server / engine {med['server'] / med['engine']:.2f})"
    print(f"medians: {line}")
    if args.json is not None:
        args.json.write_text(json.dumps(runs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
