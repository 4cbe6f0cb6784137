"""The fused CPU inference path (ravit.layers.cpu_inference) computes the reference function: same logits within fp32
rounding on every FAN family, taken only where no gradient can flow, never touching the caller's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ravit
from ravit.layers import cpu_inference
from ravit.layers.channel_processing import ChannelProcessing
from ravit.layers.cpu_inference import fast_inference

FUSED_OP = "mkldnn::_convolution_pointwise"
FUSED_LINEAR = "mkldnn::_linear_pointwise"
CHAIN_KERNEL = "ravit::dwconv_chain"
GATE_KERNEL = "ravit::channel_gate"
CASES = [
    ("test_fan_vit", {}),
    ("test_fan_vit", dict(patch_size=8)),
    ("test_fan_vit", dict(patch_size=4)),
    ("test_fan_vit_downsample", {}),
    ("test_fan_vit", dict(se_mlp=True)),
    ("test_fan_hybrid", {}),
    ("test_fan_swin", {}),
]


def _model(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    model = ravit.create_model(name, **kwargs).eval()
    with torch.no_grad():  # move every BatchNorm off its initial statistics so a wrong fold cannot hide
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1, 0.3)
                module.bias.normal_(0, 0.3)
    return model


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@pytest.mark.parametrize("kernels", ["onednn-chain", "ravit-kernels"])
@pytest.mark.parametrize("mkl_max_macs", [0, 2**40], ids=["onednn-linears", "mkl-linears"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=lambda v: str(v))
def test_fused_path_equals_reference(name, kwargs, mkl_max_macs, kernels, monkeypatch, request):
    """Both routes of the fused linears (oneDNN above the size threshold, MKL's addmm below), and both routes of the
    depthwise-conv chain and channel gate (oneDNN ops, or ravit's own kernels where built), give the reference."""
    monkeypatch.setattr(cpu_inference, "_MKL_MAX_MACS", mkl_max_macs)
    if kernels == "ravit-kernels":
        request.getfixturevalue("cpu_kernels_built")
    monkeypatch.setenv("RAVIT_CPU_KERNELS", "1" if kernels == "ravit-kernels" else "0")
    model = _model(name, kwargs)
    images = torch.randn(3, 3, 64, 64) if name != "test_fan_swin" else torch.randn(3, 3, 224, 224)
    reference = model(images).detach()  # autograd on: the reference modules
    with torch.inference_mode():
        fused = model(images)
        ops = _ops(lambda: model(images))
        assert (FUSED_LINEAR in ops) == (mkl_max_macs == 0)
        if kernels == "ravit-kernels":  # every case has DWConv mixers; the SE variant has no channel attention
            assert CHAIN_KERNEL in ops
            assert (GATE_KERNEL in ops) == any(isinstance(m, ChannelProcessing) for m in model.modules())
        else:
            assert FUSED_OP in ops and not {CHAIN_KERNEL, GATE_KERNEL} & ops
    assert not {FUSED_OP, FUSED_LINEAR, CHAIN_KERNEL, GATE_KERNEL} & _ops(lambda: model(images))
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference, rtol=0, atol=1e-5)


def test_fused_path_leaves_inputs_untouched():
    """In-place work only ever lands in buffers a call made itself."""
    model = _model("test_fan_vit", {})
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randn(2, 16, 32)
    saved_images, saved_tokens = images.clone(), tokens.clone()
    block = model.blocks[0]
    with torch.inference_mode():
        model(images)
        first = block(tokens, (4, 4))[0].clone()
        second = block(tokens, (4, 4))[0]
        mlp = block.mlp.mlp_v
        mlp(tokens, (4, 4))
    torch.testing.assert_close(images, saved_images, rtol=0, atol=0)
    torch.testing.assert_close(tokens, saved_tokens, rtol=0, atol=0)
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_gate():
    x = torch.randn(2, 3)
    with torch.inference_mode():
        assert fast_inference(torch.randn(2, 3), training=False)
        assert not fast_inference(torch.randn(2, 3), training=True)
        assert not fast_inference(torch.zeros(2, 3, dtype=torch.int64), training=False)
    with torch.no_grad():
        assert fast_inference(x, training=False)
    assert not fast_inference(x, training=False)  # autograd on: gradients may be asked for
    graph = torch.fx.Graph()
    assert not fast_inference(torch.fx.Proxy(graph.placeholder("x")), training=False)


def test_flop_counting_sees_the_reference_ops():
    """GMACs are counted on the reference modules: the FLOP counter has no formula for oneDNN's fused ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from ravit.bench.flops import count_gmacs

    model = _model("test_fan_vit", {})
    images = torch.randn(2, 3, 64, 64)
    with FlopCounterMode(display=False) as counter:
        model(images)  # autograd on: the reference path
    assert count_gmacs(model, images) == pytest.approx(counter.get_total_flops() / 2 / 2 / 1e9)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(images)
    assert count_gmacs(model, images) == pytest.approx(counter.get_total_flops() / 2 / 2 / 1e9)


def test_training_and_grad_take_the_reference_path():
    model = _model("test_fan_vit", {})
    images = torch.randn(2, 3, 64, 64, requires_grad=True)
    assert FUSED_OP not in _ops(lambda: model(images).sum().backward())
    assert images.grad is not None and images.grad.abs().sum() > 0
    model.train()
    with torch.no_grad():
        assert FUSED_OP not in _ops(lambda: model(images))


def test_bf16_autocast_runs_fused():
    """Under CPU bf16 autocast the fused convs run in bf16 and agree with fp32 to bf16 precision."""
    model = _model("test_fan_vit", {})
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert FUSED_OP in _ops(lambda: model(images))
            low = model(images).float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()


def _fmnist_or_skip():
    from ravit.data import ModelInput, open_data

    model = ravit.create_model("fmnist_fan_p4", pretrained=True).eval()
    try:
        open_data("fashion-mnist", "test", None, ModelInput.from_model(model).transform())
    except FileNotFoundError as err:
        pytest.skip(f"Fashion-MNIST not installed: {err}")
    return model


def test_eval_bf16_flag(tmp_path):
    """``ravit eval --bf16`` scores under bf16 autocast, says so in eval.json, and stays within bf16 of fp32."""
    import json

    from ravit.cli import main

    _fmnist_or_skip()
    results = {}
    for flag in ([], ["--bf16"]):
        out = tmp_path / ("bf16" if flag else "fp32")
        assert main(["eval", "fmnist_fan_p4", "--pretrained", "--limit", "300", "--output", str(out), *flag]) == 0
        results[bool(flag)] = json.loads((out / "eval.json").read_text())
    assert results[False]["precision"] == "fp32" and results[True]["precision"] == "bf16"
    assert abs(results[True]["top1"] - results[False]["top1"]) <= 1.0  # 3 of 300 images at most


def test_robustness_bf16_runs_the_model_only_in_bf16():
    """The corruptions are computed in fp32 either way (same images); only the model's forward changes precision."""
    from ravit.data import ModelInput
    from ravit.robustness.evaluate import evaluate_corruptions, image_dataset

    model = _fmnist_or_skip()
    dataset = image_dataset("fashion-mnist", ModelInput.from_model(model), "test")
    runs = {bf16: evaluate_corruptions(model, dataset, ["fog", "gaussian_noise"], [3], limit=64, batch_size=32,
                                       progress=False, bf16=bf16) for bf16 in (False, True)}
    assert runs[False].meta["precision"] == "fp32" and runs[True].meta["precision"] == "bf16"
    for c in ("fog", "gaussian_noise"):
        low, full = runs[True].counts[c][3][0], runs[False].counts[c][3][0]
        assert abs(low - full) <= 3


def test_dwconv_accumulates_into_residual():
    """DWConv's fused path adds its output into the residual buffer it is given (the documented contract that lets
    DWConvMlp skip a fresh allocation) and equals the reference; a non-contiguous residual takes the copying route."""
    torch.manual_seed(0)
    dwconv = ravit.layers.DWConv(16).eval()
    with torch.no_grad():
        dwconv.bn.running_var.uniform_(0.5, 2.0)
        dwconv.bn.running_mean.normal_(0, 0.5)
    x, residual, scale = torch.randn(2, 12, 16), torch.randn(2, 12, 16), torch.rand(16) + 0.5
    reference = dwconv(x, (3, 4), out_scale=scale, residual=residual).detach()  # autograd on: reference path
    with torch.inference_mode():
        buffer = residual.clone()
        out = dwconv(x, (3, 4), out_scale=scale, residual=buffer)
        assert out.data_ptr() == buffer.data_ptr()
        strided = residual.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
        out_strided = dwconv(x, (3, 4), out_scale=scale, residual=strided)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_strided, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(strided, residual, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "kwargs"), [("test_fan_vit", {}), ("test_fan_vit_downsample", {}),
                                              ("test_fan_hybrid", {})], ids=lambda v: str(v))
def test_block_path_skips_submodules_unless_hooked(name, kwargs, monkeypatch):
    """A FAN block on the fused path calls its layers' weights directly (no ravit ``Linear`` module runs), unless a
    hook sits in the block: then that block calls its submodules, the hook fires, and the logits are the same."""
    model = _model(name, kwargs)
    images = torch.randn(2, 3, 64, 64)
    calls = []
    forward = cpu_inference.Linear.forward
    monkeypatch.setattr(cpu_inference.Linear, "forward", lambda self, x: calls.append(self) or forward(self, x))
    seen = []
    with torch.inference_mode():
        direct = model(images)
        assert calls == []
        block = model.blocks[1]
        handle = block.mlp.mlp_v.fc1.register_forward_hook(lambda module, args, out: seen.append(out.shape))
        hooked = model(images)
        handle.remove()
        assert seen == [(2, 16, block.mlp.mlp_v.fc1.out_features)]
        called = {id(m) for m in calls}
        linears = {id(m) for m in block.modules() if isinstance(m, cpu_inference.Linear)}
        assert id(block.mlp.mlp_v.fc1) in called and called <= linears  # only the hooked block used its modules
        calls.clear()
        model(images)  # the hook is gone: the direct path again
        assert calls == []
    torch.testing.assert_close(direct, hooked, rtol=0, atol=1e-6)


def test_hooked_sees_module_global_and_nested_hooks():
    block = _model("test_fan_vit", {}).blocks[0]
    assert not cpu_inference.hooked(block)
    handle = block.mlp.mlp_v.dwconv.bn.register_forward_pre_hook(lambda module, args: None)
    assert cpu_inference.hooked(block)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    assert cpu_inference.hooked(block)
    handle.remove()
    assert not cpu_inference.hooked(block)



def test_stem_hands_the_images_to_the_first_conv_as_given():
    """The stem passes the NCHW image batch to oneDNN's conv as it is (any channels-last copy is the op's own), and
    its tokens equal the reference stem's."""
    model = _model("test_fan_vit", {})
    images = torch.randn(2, 3, 64, 64)
    reference = model.patch_embed(images)[0].detach()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.inference_mode(), torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        tokens = model.patch_embed(images)[0]

    def inside_conv(event) -> bool:
        while event is not None:
            if event.name == FUSED_OP:
                return True
            event = event.cpu_parent
        return False

    on_images = [e for e in prof.events() if list(images.shape) in e.input_shapes]
    assert any(e.name == FUSED_OP for e in on_images)
    assert all(inside_conv(e) for e in on_images if e.name in ("aten::contiguous", "aten::copy_", "aten::clone"))
    torch.testing.assert_close(tokens, reference, rtol=0, atol=1e-5)
