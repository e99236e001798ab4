"""install(): torch's CUDA allocator swapped for ours for the whole process, on a real GPU.

torch allows the swap only before CUDA initialises, so each scenario runs in a fresh Python
subprocess that prints one JSON line of findings; the test asserts on them. Skips without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_script(body: str) -> dict:
    """Runs body in a fresh interpreter; body ends by printing one JSON object."""
    code = "import json, time, torch\nfrom torch_elastic_kv import allocator as A\n" + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_install_routes_every_tensor_and_trim_gives_memory_back():
    out = run_script("""
        A.install()
        x = torch.randn(1024, 1024, device="cuda")           # 4 MiB
        y = torch.empty(3, device="cuda")                    # small: packed into a granule
        z = (x @ x).sum().item()                             # kernels run on our memory
        snap = {b["address"]: b for b in A.snapshot(0)}
        s1 = A.stats(0)
        del x, y
        torch.cuda.synchronize()
        s2 = A.stats(0)
        released = A.trim(0)
        s3 = A.stats(0)
        print(json.dumps({
            "installed": A.installed(), "finite": z == z,
            "x_in_snapshot": len(snap) >= 2, "x_tracked": any(b["size"] == 4 << 20 for b in snap.values()),
            "allocated1": s1["allocated_bytes"], "allocated2": s2["allocated_bytes"],
            "mapped2": s2["mapped_bytes"], "mapped3": s3["mapped_bytes"], "released": released,
            "cached3": s3["cached_bytes"],
        }))
    """)
    assert out["installed"] and out["finite"] and out["x_in_snapshot"] and out["x_tracked"]
    assert out["allocated1"] - out["allocated2"] >= 4 << 20
    assert out["released"] >= 4 << 20 and out["mapped3"] <= out["mapped2"] - (4 << 20)


def test_install_after_cuda_init_raises_a_clear_error():
    out = run_script("""
        torch.zeros(1, device="cuda")
        try:
            A.install()
            msg = None
        except RuntimeError as e:
            msg = str(e)
        print(json.dumps({"msg": msg, "installed": A.installed()}))
    """)
    assert out["msg"] is not None and "already initialised" in out["msg"] and not out["installed"]


def test_stream_ordered_reuse_and_no_sync_on_free():
    out = run_script("""
        A.install()
        s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
        n = 8 << 20
        with torch.cuda.stream(s1):
            x = torch.empty(n, dtype=torch.uint8, device="cuda")
            addr = x.data_ptr()
            torch.cuda._sleep(2_000_000_000)      # ~1 s of queued work on s1
            x.fill_(1)
            t0 = time.perf_counter()
            del x                                 # free on s1 while s1 is busy
            free_s = time.perf_counter() - t0
        with torch.cuda.stream(s2):
            other = torch.empty(n, dtype=torch.uint8, device="cuda")   # must not get x's memory
        with torch.cuda.stream(s1):
            same = torch.empty(n, dtype=torch.uint8, device="cuda")    # may, at once
        busy = not s1.query()
        torch.cuda.synchronize()
        print(json.dumps({"free_s": free_s, "other": other.data_ptr() != addr,
                          "same": same.data_ptr() == addr, "busy": busy}))
    """)
    assert out["busy"], "the sleep kernel finished too early for the test to mean anything"
    assert out["free_s"] < 0.1, "the free waited for the device"
    assert out["other"] and out["same"]


def test_pause_resume_under_install_restores_tensors():
    out = run_script("""
        from torch_elastic_kv import _C
        A.install()
        _C.allocator_set_thread_tag("gpu-kv")
        kv = torch.randn(64 << 20 >> 2, device="cuda")        # 64 MiB, tagged
        _C.allocator_set_thread_tag("")
        keep = torch.randn(1 << 20, device="cuda")
        ref_kv, ref_keep = kv.cpu(), keep.cpu()
        addr = kv.data_ptr()
        free0 = torch.cuda.mem_get_info()[0]
        released = A.pause("gpu-kv", backup=True)
        free1 = torch.cuda.mem_get_info()[0]
        keep_ok = torch.equal(keep.cpu(), ref_keep)
        A.resume("gpu-kv")
        print(json.dumps({"released": released, "gain": free1 - free0, "keep_ok": keep_ok,
                          "kv_ok": torch.equal(kv.cpu(), ref_kv), "same_addr": kv.data_ptr() == addr}))
    """)
    assert out["released"] >= 64 << 20 and out["gain"] >= (64 << 20) - (4 << 20)
    assert out["keep_ok"] and out["kv_ok"] and out["same_addr"]
