"""The README runs: every ```python block is executed, in order, in one namespace (a block may
use what an earlier one defined, as a reader would); blocks that need torch's CUDA tensors run
only where a GPU is present and are skipped with the reason otherwise (the fake driver backs
the core's arenas, not torch's CUDA tensors), after checking that every name they use exists.
Every path the README names must exist, and it must still open with exactly the two commands
CI reads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# files the README names as outputs or system libraries, not files of this repository
NOT_IN_REPO = {"results.json", "memory.png", "latency.png", "bench_out/", "libcuda.so.1", "PATH.csv"}
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".md", ".sh", ".csv", ".toml", ".txt")


def python_blocks(text: str) -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(README.read_text())


def _needs_cuda(block: str) -> bool:
    return "cuda" in block


@pytest.fixture(scope="module")
def namespace() -> dict:
    torch.manual_seed(0)
    return {"__name__": "readme"}


def test_readme_has_python_blocks_and_opens_with_the_two_commands():
    text = README.read_text()
    assert len(BLOCKS) >= 4
    head = re.match(r"# torch_elastic_kv\n\n```bash\n(.*?)\n```\n", text, flags=re.S)
    assert head is not None, "the README must open with the title, then the bash block CI reads"
    lines = head.group(1).splitlines()
    assert len(lines) == 2 and all(line.startswith("pip install torch==") for line in lines)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, namespace: dict, capsys) -> None:
    block = BLOCKS[index]
    code = compile(block, f"README.md python block {index + 1}", "exec")
    if _needs_cuda(block) and not torch.cuda.is_available():
        _check_names(block, namespace)
        reason = f"README block {index + 1} needs torch's CUDA tensors and this machine has no GPU"
        with capsys.disabled():
            print(f"\n{reason}: names checked, not run")
        pytest.skip(reason)
    exec(code, namespace)


def _check_names(block: str, namespace: dict) -> None:
    """A block that cannot run here still must not name what does not exist: every
    ``module.attr`` over the README's modules resolves, every import works."""
    import torch_elastic_kv as ekv

    for line in block.splitlines():
        m = re.match(r"\s*from (\S+) import (\w+)", line)
        if m:
            module = __import__(m.group(1), fromlist=[m.group(2)])
            namespace[m.group(2)] = getattr(module, m.group(2))
    namespace.setdefault("ekv", ekv)
    for obj_name, attr in re.findall(r"\b(allocator|ekv)\.(\w+)", block):
        assert hasattr(namespace[obj_name], attr), f"README: {obj_name}.{attr} does not exist"
    for attr in re.findall(r"\barena\.(\w+)", block):
        assert hasattr(ekv.Arena, attr), f"README: Arena.{attr} does not exist"


def _named_paths(text: str) -> set[str]:
    out = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in span.split():
            word = word.strip("\"'(),")
            if not re.fullmatch(r"[\w.][\w./-]*", word) or word.startswith("./") or word in NOT_IN_REPO:
                continue
            if "/" in word or word.endswith(SOURCE_SUFFIXES):
                out.add(word)
    return out


def _exists(name: str) -> bool:
    for base in (ROOT, ROOT / "src" / "torch_elastic_kv", ROOT / "csrc"):
        if (base / name).exists():
            return True
    if "/" not in name.rstrip("/"):  # a bare file name, as the Layout section lists them
        return any(p for p in ROOT.rglob(name.rstrip("/")) if ".git" not in p.parts)
    return False


def test_every_path_the_readme_names_exists():
    names = _named_paths(README.read_text())
    assert "src/torch_elastic_kv/engine/policy.py" in names and "csrc/core/host_backend.cpp" in names
    missing = sorted(n for n in names if not _exists(n))
    assert not missing, f"README names paths that do not exist: {missing}"


def test_the_allocator_is_importable_where_the_readme_shows_it():
    from torch_elastic_kv import allocator
    from torch_elastic_kv.memory import allocator as where_it_lives

    assert allocator is where_it_lives
