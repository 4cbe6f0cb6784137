"""ravit's CPU kernels (ravit.layers.cpu_kernels) compute FAN's depthwise-conv chain and channel-attention gate as the
reference modules do, are used only where they apply, and build or fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ravit.cli import main
from ravit.layers import cpu_kernels
from ravit.layers.channel_processing import ChannelProcessing, channel_attention_gate
from ravit.layers.dwconv import DWConv


def _dwconv(channels: int, bias: bool = True, affine: bool = True) -> DWConv:
    torch.manual_seed(channels)
    module = DWConv(channels).eval()
    with torch.no_grad():
        for conv in (module.conv1, module.conv2):
            conv.weight.normal_(0, 0.5)
            if not bias:
                conv.bias = None
        module.bn.running_mean.normal_(0, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
        if affine:
            module.bn.weight.normal_(1, 0.3)
            module.bn.bias.normal_(0, 0.3)
        else:
            module.bn.weight, module.bn.bias = None, None
    return module


def _reference_chain(module: DWConv, x: torch.Tensor, hw: tuple[int, int], out_scale: torch.Tensor | None
                     ) -> torch.Tensor:
    """conv2(BN(GELU(conv1(x)))) · out_scale from torch's own ops, (B, N, C) -> (B, N, C)."""
    B, N, C = x.shape
    y = x.transpose(1, 2).reshape(B, C, *hw)
    y = module.conv2(module.bn(F.gelu(module.conv1(y))))
    y = y.flatten(2).transpose(1, 2)
    return y if out_scale is None else y * out_scale


# (B, H, W, C): FAN-T's hidden width on its 14x14 grid, batches, non-square and one-pixel grids, and channel counts
# that leave a single-vector block (C / lanes odd)
SHAPES = [(1, 14, 14, 768), (3, 5, 7, 32), (2, 1, 1, 16), (1, 2, 3, 48), (2, 4, 9, 80)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_dwconv_chain_equals_reference(cpu_kernels_built, shape, bias, affine):
    B, H, W, C = shape
    if C % cpu_kernels.LANES[cpu_kernels.capability()]:
        pytest.skip("channel count below this CPU's vector width")
    module = _dwconv(C, bias, affine)
    x = torch.randn(B, H * W, C) * 2
    out_scale = torch.rand(C) + 0.5
    with torch.no_grad():
        for scale in (None, out_scale):
            expected = _reference_chain(module, x, (H, W), scale)
            got = cpu_kernels.dwconv_chain(x, (H, W), module.conv1, module.bn, module.conv2, scale, None)
            torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
            residual = torch.randn(B, H * W, C)
            added = residual.clone()
            same = cpu_kernels.dwconv_chain(x, (H, W), module.conv1, module.bn, module.conv2, scale, added)
            assert same is added  # accumulated in the residual's own memory
            torch.testing.assert_close(added, residual + expected, rtol=0, atol=2e-5)
            strided = torch.empty(B, H * W, 2 * C)[..., :C].copy_(residual)  # not contiguous: added afterwards
            fresh = cpu_kernels.dwconv_chain(x, (H, W), module.conv1, module.bn, module.conv2, scale, strided)
            assert fresh is not strided
            torch.testing.assert_close(fresh, residual + expected, rtol=0, atol=2e-5)
            inplace = x.clone()  # the residual is the input itself, as FAN's MLP passes it
            cpu_kernels.dwconv_chain(inplace, (H, W), module.conv1, module.bn, module.conv2, scale, inplace)
            torch.testing.assert_close(inplace, x + expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(("B", "N", "C", "heads"), [(1, 196, 192, 4), (8, 196, 192, 4), (2, 49, 448, 8),
                                                     (3, 10, 20, 2), (1, 1, 16, 1)])
def test_channel_gate_equals_reference(cpu_kernels_built, B, N, C, heads):
    torch.manual_seed(N)
    q, k = torch.randn(B, N, C) * 3, torch.randn(B, N, C) * 3
    temperature = torch.rand(heads, 1, 1) + 0.5
    out_scale = torch.rand(C) + 0.5
    expected = channel_attention_gate(q, k, temperature)  # (B, 1, C)
    torch.testing.assert_close(cpu_kernels.channel_gate(q, k, temperature), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(cpu_kernels.channel_gate(q, k, temperature, out_scale), expected * out_scale,
                               rtol=0, atol=1e-6)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def test_modules_use_the_kernels_only_where_they_apply(cpu_kernels_built, monkeypatch):
    """fp32 inference with a whole-vector channel count takes the kernels; bf16 autocast, a channel count off the
    vector width, autograd and RAVIT_CPU_KERNELS=0 keep the other paths, all with the reference's result."""
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    lanes = cpu_kernels.LANES[cpu_kernels.capability()]
    for channels, heads, used in ((2 * lanes, 2, True), (lanes + 1, 1, False)):  # MLP width 4 x channels
        module = ChannelProcessing(channels, num_heads=heads).eval()
        tokens = torch.randn(2, 16, channels)
        reference = module(tokens, (4, 4)).detach()  # autograd on: the reference modules
        def run(m=module, t=tokens):
            return m(t, (4, 4))

        with torch.inference_mode():
            ops = _ops(run)
            assert ("ravit::dwconv_chain" in ops) == used
            assert "ravit::channel_gate" in ops  # any head width
            torch.testing.assert_close(run(), reference, rtol=0, atol=1e-5)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert not {"ravit::dwconv_chain", "ravit::channel_gate"} & _ops(run)
            monkeypatch.setenv("RAVIT_CPU_KERNELS", "0")
            assert not cpu_kernels.available()
            assert not {"ravit::dwconv_chain", "ravit::channel_gate"} & _ops(run)
            monkeypatch.delenv("RAVIT_CPU_KERNELS")
    module = DWConv(2 * lanes).eval()
    x = torch.randn(1, 9, 2 * lanes)
    assert "ravit::dwconv_chain" not in _ops(lambda: module(x, (3, 3)))  # autograd on


def test_kernels_refuse_what_they_cannot_compute(cpu_kernels_built):
    x = torch.randn(1, 2, 2, 32)
    w = torch.randn(32, 1, 3, 3)
    ones, zeros = torch.ones(32), torch.zeros(32)
    args = (w, None, None, None, zeros, ones, 1e-5, w, None, None)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.ravit.dwconv_chain(x.transpose(1, 2), *args, torch.empty(1, 2, 2, 32), False)
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.ravit.dwconv_chain(x.double(), *args, torch.empty(1, 2, 2, 32), False)
    with pytest.raises(RuntimeError, match="multiple of"):
        torch.ops.ravit.dwconv_chain(torch.randn(1, 2, 2, 33), torch.randn(33, 1, 3, 3), None, None, None,
                                     torch.zeros(33), torch.ones(33), 1e-5, torch.randn(33, 1, 3, 3), None, None,
                                     torch.empty(1, 2, 2, 33), False)
    with pytest.raises(RuntimeError, match="out_scale must have 32"):
        torch.ops.ravit.dwconv_chain(x, *args[:-1], torch.ones(31), torch.empty(1, 2, 2, 32), False)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        torch.ops.ravit.channel_gate(torch.randn(1, 4, 32), torch.randn(1, 4, 32), torch.ones(3), None,
                                     torch.empty(1, 32))


def test_build_fails_cleanly(tmp_path, monkeypatch):
    """No supported capability, no compiler, a failing compiler: a KernelBuildError, and nothing in the cache that
    ``available`` could load."""
    monkeypatch.setenv("RAVIT_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "library_path", cpu_kernels.library_path.__wrapped__)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    with pytest.raises(cpu_kernels.KernelBuildError, match="AVX512 or AVX2"):
        cpu_kernels.build()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_kernels.KernelBuildError, match="no C\\+\\+ compiler"):
        cpu_kernels.build()
    monkeypatch.setenv("CXX", "false")
    with pytest.raises(cpu_kernels.KernelBuildError, match="failed"):
        cpu_kernels.build()
    assert list(tmp_path.iterdir()) == []


def test_kernels_command(capsys, monkeypatch):
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    assert main(["kernels", "status"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["capability"] == cpu_kernels.capability()
    assert status["built"] == (status["library"] is not None and Path(status["library"]).is_file())
    assert status["in_use"] == cpu_kernels.available()


def test_parameters_reach_the_kernel(cpu_kernels_built):
    """Every argument matters: changing any parameter of the chain changes the kernel's output as the reference's."""
    module = _dwconv(32)
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        base = cpu_kernels.dwconv_chain(x, (3, 3), module.conv1, module.bn, module.conv2, None, None)
        for tensor in (module.conv1.weight, module.conv1.bias, module.bn.weight, module.bn.bias,
                       module.bn.running_mean, module.bn.running_var, module.conv2.weight, module.conv2.bias):
            tensor.add_(0.1)
            changed = cpu_kernels.dwconv_chain(x, (3, 3), module.conv1, module.bn, module.conv2, None, None)
            assert not torch.allclose(changed, base)
            torch.testing.assert_close(changed, _reference_chain(module, x, (3, 3), None), rtol=0, atol=2e-5)
            base = changed


def test_bn_eps_reaches_the_kernel(cpu_kernels_built):
    module = _dwconv(16)
    module.bn.running_var.fill_(1e-3)
    x = torch.randn(1, 4, 16)
    with torch.no_grad():
        for eps in (1e-5, 1e-1):
            module.bn.eps = eps
            got = cpu_kernels.dwconv_chain(x, (2, 2), module.conv1, module.bn, module.conv2, None, None)
            torch.testing.assert_close(got, _reference_chain(module, x, (2, 2), None), rtol=0, atol=2e-5)

