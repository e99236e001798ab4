"""PackedLinears: nn.Linear on oneDNN-prepacked weights, and the Engine's use of it.

What must hold: the packed path is really taken (the layer's own forward is not called),
its results agree with F.linear to float32 rounding, it never serves stale weights, it steps
aside for autograd and non-float32 input, restore() leaves the model exactly as it was, and
the Engine installs it on a float32 CPU model, rejects a prepack it cannot do, and restores
the model on close.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torch_elastic_kv import ElasticPolicy, Engine
from torch_elastic_kv.hf.prepack import PackedLinears, eligible_linears, is_packed, prepack_available
from torch_elastic_kv.testing.models import tiny_llama

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.skipif(not prepack_available(), reason="no oneDNN linear in this torch build"),
]

MiB = 1 << 20


@pytest.fixture
def linear_calls(monkeypatch) -> list:
    """Counts calls of F.linear, which nn.Linear's own forward goes through (the packed path
    does not)."""
    calls: list = []
    real = F.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    return calls


def _net(bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96, bias=bias), torch.nn.ReLU(), torch.nn.Linear(96, 40, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (1, 7, 64), (3, 200, 64), (0, 64)])
def test_packed_results_match_f_linear_and_skip_the_layers_forward(bias, shape, linear_calls):
    net = _net(bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = net(x)
    packed = PackedLinears(net)
    assert packed.count == 2
    linear_calls.clear()
    with torch.inference_mode():
        out = net(x)
    assert not linear_calls  # the oneDNN path ran, not nn.Linear.forward
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    packed.restore()


def test_non_contiguous_input():
    layer = torch.nn.Linear(32, 48)
    x = torch.randn(32, 9).t()  # [9, 32], stride (1, 9)
    with torch.no_grad():
        ref = layer(x)
        with PackedLinears(layer):
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_weights_changed_after_packing_are_followed_not_stale():
    layer = torch.nn.Linear(16, 24)
    x = torch.randn(4, 16)
    with PackedLinears(layer), torch.no_grad():
        before = layer(x)
        layer.weight.mul_(-2.0)  # in place: the version counter moves
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(layer(x), before)
        layer.weight = torch.nn.Parameter(torch.randn(24, 16))  # a new tensor altogether
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        layer.weight.data = torch.randn(24, 16)  # new data, same Parameter, same version counter
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_use_the_layers_own_forward(linear_calls):
    net = _net()
    packed = PackedLinears(net)
    linear_calls.clear()
    x = torch.randn(3, 64, requires_grad=True)
    net(x).sum().backward()  # grad mode: the packed op has no backward
    assert len(linear_calls) == 2
    assert x.grad is not None and net[0].weight.grad is not None
    linear_calls.clear()
    with torch.no_grad():
        net(torch.randn(3, 64))  # no grad, float32: packed
        assert not linear_calls
        # other input dtypes go to the layer's own forward, which says what it says unpacked
        with pytest.raises(RuntimeError):
            net[0](torch.randn(3, 64, dtype=torch.bfloat16))
        assert len(linear_calls) == 1
    packed.restore()
    bf = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert eligible_linears(bf) == 0 and PackedLinears(bf).count == 0


class ScaledLinear(torch.nn.Linear):
    """A subclass with a forward of its own: packing it would drop the scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_subclasses_with_their_own_forward_are_left_alone():
    net = torch.nn.Sequential(ScaledLinear(8, 8), torch.nn.Linear(8, 8))
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = net(x)
        with PackedLinears(net) as packed:
            assert packed.count == 1 and not is_packed(net[0]) and is_packed(net[1])
            torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_restore_puts_the_model_back_and_a_second_install_leaves_packed_layers_alone(linear_calls):
    net = _net()
    first = PackedLinears(net)
    second = PackedLinears(net)  # e.g. two Engines on one model
    assert first.count == 2 and second.count == 0
    assert first.packed_bytes == (64 * 96 + 96 * 40) * 4
    second.restore()
    linear_calls.clear()
    with torch.no_grad():
        net(torch.randn(2, 64))
    assert not linear_calls  # still packed by the first
    first.restore()
    for m in (net[0], net[2]):
        assert type(m) is torch.nn.Linear and not hasattr(m, "_ekv_packed_linear")
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = net(x)
        assert len(linear_calls) == 2  # both layers on their own forward again
        hidden = torch.relu(F.linear(x, net[0].weight, net[0].bias))
        assert torch.equal(out, F.linear(hidden, net[2].weight, net[2].bias))


def test_a_deepcopy_or_pickle_of_a_packed_model_computes_with_its_own_weights():
    import copy
    import io

    net = _net()
    x = torch.randn(3, 64)
    with PackedLinears(net), torch.no_grad():
        ref = net(x)
        twin = copy.deepcopy(net)
        buf = io.BytesIO()
        torch.save(net, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for m in (twin, loaded):
            assert is_packed(m[0])
            torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
            m[0].weight.zero_()
            m[0].bias.zero_()
            assert torch.equal(m(x), m[2].bias.expand(3, -1))  # its own (zeroed) weights
        torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)  # the original untouched


def test_bad_arguments():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        PackedLinears("model")


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_engine_packs_a_float32_cpu_model_and_close_restores_it(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    prompts = [[5, 6, 7, 8], list(range(3, 40)), [9] * 12]
    with torch.no_grad():
        refs = [
            model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False)[0, len(p) :].tolist() for p in prompts
        ]
    eng = Engine(model, policy=ElasticPolicy(max_bytes=8 * MiB), background=False)
    assert eng.stats()["prepacked_layers"] == len(linears) == 2 * 7 + 1
    assert all(is_packed(m) for m in linears)
    assert eng.generate(prompts, 10) == refs
    eng.close()
    assert not any(is_packed(m) for m in linears)

    off = Engine(model, policy=ElasticPolicy(max_bytes=8 * MiB), background=False, prepack_weights=False)
    assert off.stats()["prepacked_layers"] == 0
    assert not any(is_packed(m) for m in linears)
    assert off.generate(prompts, 10) == refs
    off.close()


def test_engine_rejects_a_prepack_it_cannot_do_and_changes_nothing(model):
    bf16 = tiny_llama(dtype=torch.bfloat16)
    attn = bf16.config._attn_implementation
    with pytest.raises(ValueError, match=r"prepack_weights=True but the model is torch.bfloat16 on cpu"):
        Engine(bf16, policy=ElasticPolicy(max_bytes=8 * MiB), background=False, prepack_weights=True)
    assert bf16.config._attn_implementation == attn
    assert not any(is_packed(m) for m in bf16.modules())
    eng = Engine(bf16, policy=ElasticPolicy(max_bytes=8 * MiB), background=False)  # auto: off
    assert eng.stats()["prepacked_layers"] == 0
    eng.close()
    with pytest.raises(ValueError, match="prepack_weights must be None, True or False"):
        Engine(model, policy=ElasticPolicy(max_bytes=8 * MiB), background=False, prepack_weights="yes")
    assert not any(is_packed(m) for m in model.modules())
