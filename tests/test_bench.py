"""``bench --quick`` end to end: results.json in range, readable plots, equal outputs, memory given back."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from torch_elastic_kv import __main__ as cli_main
from torch_elastic_kv.bench.metrics import output_checksum
from torch_elastic_kv.bench.models import load_model
from torch_elastic_kv.bench.systems import _no_eos
from torch_elastic_kv.bench.traces import prompt_token_ids, scale_trace, synthetic_requests

SYSTEMS = ("elastic", "static", "hf-generate", "hf-generate-batch")
# the per-system fields issue 6 asks of results.json
ISSUE_FIELDS = (
    "tokens_per_s",
    "ttft_p50_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "mean_resident_bytes",
    "peak_resident_bytes",
    "idle_resident_bytes",
    "preemptions",
    "output_checksum",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    status = cli_main.main(["bench", "--quick", "--out", str(out), "--no-progress"])
    assert status == 0
    with open(out / "results.json") as handle:
        return out, json.load(handle)


def test_results_fields_are_numbers_in_range(quick_run):
    out, results = quick_run
    assert sorted(p.name for p in out.iterdir()) == ["latency.png", "memory.png", "results.json", "summary.md"]
    assert tuple(results["systems"]) == SYSTEMS
    trace = results["trace"]
    assert trace["name"] == "bursty" and trace["requests"] == 12
    assert trace["scaling"]["description"] == "unscaled"
    pool = results["static_pool_bytes"]
    assert pool > 0 and pool % (2 << 20) == 0
    settings = results["settings"]  # the run's settings, as resolved from the command line
    assert settings["trace"] == "bursty" and settings["systems"] == list(SYSTEMS) and settings["quick"] is True
    assert settings["seed"] == 0 and settings["device"] == "cpu" and settings["dtype"] == "float32"
    assert settings["config"] == "tiny" and settings["max_bytes_resolved"] == pool
    assert (settings["time_scale"], settings["token_scale"], settings["thin"]) == (1.0, 1.0, 1)
    for key in (
        "window",
        "min_bytes",
        "headroom",
        "idle_seconds",
        "tail_seconds",
        "max_running",
        "max_batch_tokens",
        "page_tokens",
        "threads",
    ):
        assert key in settings, key
    assert results["command"][:2] == ["ekv-bench", "--quick"]
    for name, s in results["systems"].items():
        assert set(ISSUE_FIELDS) <= set(s), (name, set(ISSUE_FIELDS) - set(s))
        # preemptions: a count where the system exposes one (continuous batching does not: null)
        assert s["preemptions"] is None if name == "hf-generate-batch" else isinstance(s["preemptions"], int)
        assert s["requests"] == trace["requests"] and s["output_tokens"] == trace["output_tokens"], name
        assert s["tokens_per_s"] > 0 and s["busy_tokens_per_s"] >= s["tokens_per_s"], name
        assert 0 <= s["ttft_p50_s"] <= s["ttft_p99_s"] < s["duration_s"], name
        assert 0 <= s["tpot_p50_s"] <= s["tpot_p99_s"] < s["duration_s"], name
        assert s["duration_s"] >= s["load_duration_s"] + results["settings"]["tail_seconds"] * 0.99, name
        assert 0 <= s["idle_resident_bytes"] <= s["peak_resident_bytes"], name
        assert 0 <= s["mean_resident_bytes"] <= s["peak_resident_bytes"], name
        assert 0 < s["peak_live_bytes"] <= s["peak_resident_bytes"], name
        assert len(s["output_checksum"]) == 64 and int(s["output_checksum"], 16) >= 0
        for key, value in s.items():
            if isinstance(value, float):
                assert math.isfinite(value), (name, key)
    for name in ("elastic", "static"):
        s = results["systems"][name]
        assert isinstance(s["preemptions"], int) and s["preemptions"] >= 0
        assert s["peak_resident_bytes"] <= pool  # never above the budget
    static = results["systems"]["static"]
    assert static["mean_resident_bytes"] == static["peak_resident_bytes"] == static["idle_resident_bytes"] == pool
    assert results["systems"]["hf-generate"]["idle_resident_bytes"] == 0
    assert set(results["timelines"]) == set(SYSTEMS)
    assert len(results["arrivals_s"]) == trace["requests"]


def test_elastic_follows_demand_on_bursty_trace(quick_run):
    _, results = quick_run
    elastic, static = results["systems"]["elastic"], results["systems"]["static"]
    assert elastic["mean_resident_bytes"] < static["mean_resident_bytes"]
    assert elastic["memory_byte_seconds_saved_vs_static"] > 0
    pool = elastic["pool"]
    floor = pool["granule_bytes"] * pool["arenas"] + results["settings"]["min_bytes"]
    assert elastic["idle_resident_bytes"] <= floor
    assert elastic["shrinks"] >= 1


def test_outputs_identical_and_equal_to_generate_alone(quick_run):
    _, results = quick_run
    systems = results["systems"]
    assert systems["elastic"]["output_checksum"] == systems["static"]["output_checksum"]
    assert "elastic = static" in results["checksum_note"] or "identical across" in results["checksum_note"]
    # same seed -> same prompts and weights: each prompt alone through generate gives the same tokens
    model, info = load_model("tiny", None, "cpu", "float32", seed=0)
    trace = scale_trace(
        "bursty", "synthetic", synthetic_requests("bursty", 0, quick=True), max_total_tokens=info.max_positions
    )
    outputs = []
    with _no_eos(model), torch.inference_mode():
        for prompt, request in zip(prompt_token_ids(trace, info.vocab_size, 0), trace.requests):
            ids = torch.tensor([prompt])
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=request.output_tokens,
                pad_token_id=0,
            )
            outputs.append(generated[0, len(prompt) :].tolist())
    assert output_checksum(outputs) == systems["elastic"]["output_checksum"]


def test_plots_are_readable_pngs(quick_run):
    import matplotlib.image as mpimg

    out, _ = quick_run
    for name, min_width in (("memory.png", 900), ("latency.png", 1100)):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = mpimg.imread(out / name)
        height, width = image.shape[:2]
        assert width >= min_width and height >= 400, (name, image.shape)
        assert image.std() > 0.01  # not a blank canvas


def test_summary_table(quick_run):
    out, results = quick_run
    text = (out / "summary.md").read_text()
    for name in SYSTEMS:
        assert f"| {name} " in text
    assert results["systems"]["elastic"]["output_checksum"][:12] in text
    assert "scaling: unscaled" in text


def test_failure_while_running_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    # the second system fails after the first ran (a pool too small to be refused up front
    # used to be the way; the arguments are checked before anything runs now)
    from torch_elastic_kv.bench import run as bench_run

    real = bench_run.run_system

    def second_fails(name, *args, **kwargs):
        if name == "static":
            raise MemoryError("static: a request needs 9 KV pages but the budget allows 8")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(bench_run, "run_system", second_fails)
    status = cli_main.main(["bench", "--quick", "--systems", "elastic,static", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1
    assert len([line for line in err if line.startswith("ekv-bench: error:")]) == 1
    assert "needs" in err[-1] and "nothing written" in err[-1]
    assert not out.exists()


def test_quick_azure_replay_says_what_was_scaled_and_credits_the_data(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    captions: dict[str, list[str]] = {}
    save, text = Figure.savefig, Figure.text

    def record_text(fig, x, y, s, *args, **kwargs):
        fig._ekv_texts = [*getattr(fig, "_ekv_texts", []), str(s)]
        return text(fig, x, y, s, *args, **kwargs)

    def record_save(fig, path, *args, **kwargs):
        captions[os.path.basename(str(path))] = getattr(fig, "_ekv_texts", [])
        return save(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "text", record_text)
    monkeypatch.setattr(Figure, "savefig", record_save)
    out = tmp_path / "out"
    assert (
        cli_main.main(
            ["bench", "--quick", "--trace", "azure-code", "--systems", "elastic", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    trace = results["trace"]
    assert trace["name"] == "azure-code" and trace["requests"] == 40
    assert "CC-BY 4.0" in trace["attribution"] and "Splitwise" in trace["attribution"]
    assert trace["scaling"]["description"] == (
        "window 0-300 s of the trace; 1 in 20 requests kept; time x1/100; token counts x1/16"
    )
    assert trace["duration_s"] <= 3.0
    summary = (out / "summary.md").read_text()
    assert "CC-BY 4.0" in summary and "time x1/100" in summary
    for picture in ("memory.png", "latency.png"):  # each picture carries the credit and the scaling
        caption = "\n".join(captions[picture])
        assert "CC-BY 4.0" in caption and "Splitwise" in caption and "time x1/100" in caption, picture
    assert results["systems"]["elastic"]["output_tokens"] == trace["output_tokens"]


def test_model_path_loads_a_local_checkpoint(tmp_path):
    """``--model PATH``: a checkpoint saved on disk (no hub) is what runs, and its tokens are its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    saved = LlamaForCausalLM(config).eval()
    checkpoint = tmp_path / "my-llama"
    saved.save_pretrained(checkpoint)
    out = tmp_path / "out"
    assert (
        cli_main.main(
            ["bench", "--quick", "--model", str(checkpoint), "--systems", "elastic", "--out", str(out), "--no-progress"]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    model = results["model"]
    assert model["name"] == "my-llama" and results["settings"]["model_path"] == str(checkpoint)
    assert results["settings"]["config"] is None
    assert model["parameters"] == sum(p.numel() for p in saved.parameters())
    assert (model["num_layers"], model["num_kv_heads"], model["head_dim"], model["vocab_size"]) == (2, 1, 32, 300)
    assert model["kv_bytes_per_token"] == 2 * 2 * 1 * 32 * 4
    # the saved weights produced the tokens: every request alone through generate gives the same
    trace = scale_trace("bursty", "synthetic", synthetic_requests("bursty", 0, quick=True), max_total_tokens=512)
    assert results["systems"]["elastic"]["output_tokens"] == trace.output_tokens
    outputs = []
    with _no_eos(saved), torch.inference_mode():
        for prompt, request in zip(prompt_token_ids(trace, 300, 0), trace.requests):
            ids = torch.tensor([prompt])
            generated = saved.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=request.output_tokens,
                pad_token_id=0,
            )
            outputs.append(generated[0, len(prompt) :].tolist())
    assert output_checksum(outputs) == results["systems"]["elastic"]["output_checksum"]
