"""``vllm serve`` habits on the command line: a positional model, ``--max-model-len``, ``--dtype
half``, ``--chat-template``, several served names, IEC and SI sizes, ``--gpu-memory-utilization``,
and ``--help`` naming this machine's default KV ceiling. Each bad value is exit 2, one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from torch_elastic_kv import _units
from torch_elastic_kv.serve import cli, server
from torch_elastic_kv.serve.default_model import build_default_model, write_default_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_default_model_dir(tmp_path_factory.mktemp("cli") / "model"))


def _exit_2(argv, needle, capsys) -> None:
    assert cli.serve_main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ekv-serve: error: "), (argv, err)
    assert needle in err, (argv, err)


def test_sizes_iec_and_si_with_their_real_meanings():
    p = _units.parse_size
    assert [p(t) for t in ("4Gi", "4GiB", "4G", "64Mi", "64M", "64MB", "64mb", "2kB", "2Ki", "1Ti", "1TB")] == [
        4 << 30,
        4 << 30,
        4 << 30,
        64 << 20,
        64 << 20,
        64_000_000,
        64_000_000,
        2000,
        2048,
        1 << 40,
        10**12,
    ]
    for bad in ("4Gib2", "4iB", "4Q", "MB", "-1M", ""):
        with pytest.raises(ValueError, match="byte count"):
            p(bad)
    s = cli.resolve(["--max-kv-bytes", "64MB", "--min-kv-bytes", "4Mi", "--swap-bytes", "1Gi", "--device", "cpu"])
    assert (s.max_kv_bytes, s.min_kv_bytes, s.swap_bytes) == (64_000_000, 4 << 20, 1 << 30)


def test_broker_and_bench_take_the_same_sizes(tmp_path):
    from torch_elastic_kv.bench import cli as bench_cli

    r = bench_cli.resolve(["--quick", "--max-bytes", "64Mi", "--min-bytes", "4MB", "--out", str(tmp_path / "out")])
    assert (r.settings.max_bytes, r.settings.min_bytes) == (64 << 20, 4_000_000)

    def broker(*argv: str) -> subprocess.CompletedProcess:
        sock = str(tmp_path / "b.sock")
        cmd = [sys.executable, "-m", "torch_elastic_kv", "broker", "--socket", sock, *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    bad = broker("--budget", "4Qi")
    assert bad.returncode == 2 and "--budget" in bad.stderr and "4Qi" in bad.stderr
    # 4Gi is read as a budget: the command goes on to the next option's check
    later = broker("--budget", "4Gi", "--reclaim-seconds", "0")
    assert later.returncode == 2 and "--reclaim-seconds must be > 0" in later.stderr, later.stderr


def test_positional_model_and_the_flag_agree(model_dir, capsys):
    assert cli.resolve([model_dir, "--device", "cpu"]).model == model_dir
    assert cli.resolve(["--model", model_dir, "--device", "cpu"]).model == model_dir
    assert cli.resolve([model_dir, "--model", model_dir, "--device", "cpu"]).model == model_dir
    s = cli.resolve([model_dir, "--device", "cpu"])
    assert s.served_model_name == model_dir and s.served_model_names == (model_dir,)
    _exit_2([model_dir, "--model", model_dir + "-other"], "given twice", capsys)
    _exit_2([model_dir + "-missing"], "not a directory", capsys)


def test_dtype_names_and_aliases():
    for given, want in (("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16"), ("auto", "auto")):
        assert cli.resolve(["--dtype", given, "--device", "cpu"]).dtype == want


def test_served_model_names_max_model_len_and_chat_template(model_dir, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages[0]['content'] }}")
    s = cli.resolve(
        [model_dir, "--served-model-name", "a", "b", "a", "--max-model-len", "512", "--chat-template", str(template)]
        + ["--device", "cpu"]
    )
    assert (s.served_model_name, s.served_model_names) == ("a", ("a", "b"))
    assert s.max_model_len == 512 and s.chat_template == "{{ messages[0]['content'] }}"
    assert cli.resolve(["--max-model-len", "2048", "--device", "cpu"]).max_model_len == 2048


def test_gpu_memory_utilization_is_a_ceiling_after_the_model():
    s = cli.resolve(["--gpu-memory-utilization", "0.5", "--device", "cpu"])
    assert s.gpu_memory_utilization == 0.5 and s.max_kv_bytes is None
    model = build_default_model()
    held = server.model_bytes(model)
    assert held == sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert cli.device_memory("cpu") == total
    assert server.utilization_ceiling(0.5, total, held) == int(0.5 * total) - held
    with pytest.raises(ValueError, match="under one KV chunk"):
        server.utilization_ceiling(0.5, 2 * held, held)


def test_bad_values_exit_2_with_one_line(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jinja"
    empty.write_text("  \n")
    cases = [
        (["--max-model-len", "0"], "--max-model-len must be between 1"),
        (["--max-model-len", "many"], "--max-model-len must be an integer"),
        (["--max-model-len", "4096"], "above the model's max_position_embeddings (2048)"),
        ([model_dir, "--max-model-len", "3000"], "above the model's max_position_embeddings (2048)"),
        (["--dtype", "double"], "--dtype must be one of"),
        (["--chat-template", str(tmp_path / "missing.jinja")], "--chat-template"),
        (["--chat-template", str(tmp_path)], "a directory"),
        (["--chat-template", str(empty)], "the file is empty"),
        (["--served-model-name"], "expected at least one argument"),
        (["--served-model-name", ""], "--served-model-name must be 1-256 printable"),
        (["--max-kv-bytes", "4Qi"], "--max-kv-bytes"),
        (["--max-kv-bytes", "64MBi"], "--max-kv-bytes"),
        (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization must be above 0"),
        (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization must be between 0 and 1"),
        (["--gpu-memory-utilization", "most"], "--gpu-memory-utilization must be a number"),
        (["--gpu-memory-utilization", "0.5", "--max-kv-bytes", "64M"], "give one"),
        (["--gpu-memory-utilization", "1e-12", "--device", "cpu"], "below the KV floor"),
        (["--http", "h2"], "--http must be one of auto, httptools, h11, got 'h2'"),
        (["--loop", "trio"], "--loop must be one of auto, uvloop, asyncio, got 'trio'"),
        (["--front", "fork"], "--front must be one of auto, process, thread, got 'fork'"),
        (["--front", "process", "-tp", "2"], "--front process serves one Engine; with --tensor-parallel-size 2"),
    ]
    for argv, needle in cases:
        _exit_2(argv, needle, capsys)


def test_help_names_the_default_ceiling_and_the_size_suffixes():
    out = subprocess.run(
        [sys.executable, "-m", "torch_elastic_kv", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert f"cpu: 25 % of RAM = {physical // 4 / 2**30:.1f} GiB" in out.stdout
    assert "64MB (x 1000^2)" in out.stdout and "a bare K/M/G/T is binary" in out.stdout
    text = " ".join(out.stdout.split())
    assert "a ceiling, not a reservation" in text and "MODEL" in text and "--max-model-len" in text
    if torch.cuda.is_available():
        assert "cuda:0: 90 % of the memory free" in out.stdout


def test_the_http_stack_is_the_c_one_when_installed_and_named_ones_must_be(monkeypatch):
    from torch_elastic_kv.serve import settings

    have = {"httptools", "uvloop"}
    monkeypatch.setattr(settings.importlib.util, "find_spec", lambda name: object() if name in have else None)
    assert settings.http_stack() == ("httptools", "uvloop")
    assert settings.http_stack("h11", "asyncio") == ("h11", "asyncio")
    have = {"uvloop"}  # no httptools: auto falls back, asking for it by name is an error
    assert settings.http_stack() == ("h11", "uvloop")
    with pytest.raises(settings.UsageError, match=r"--http httptools: the httptools package is not installed"):
        settings.http_stack("httptools", "auto")
    have = set()
    assert settings.http_stack() == ("h11", "asyncio")
    with pytest.raises(settings.UsageError, match=r"--loop uvloop: the uvloop package is not installed"):
        settings.http_stack("auto", "uvloop")


def test_the_http_front_is_a_process_unless_tensor_parallel():
    assert cli.resolve([]).front == "process"
    assert cli.resolve(["--front", "Thread"]).front == "thread"
    assert cli.resolve(["-tp", "2"]).front == "thread"
    assert cli.resolve(["-tp", "2", "--front", "thread"]).front == "thread"
