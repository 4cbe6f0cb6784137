"""timm conformance of every registered FAN model: TorchScript, torch.fx through timm's feature extraction, and
``forward_intermediates``, as timm's own ``tests/test_models.py`` checks its models (markers torchscript, fxforward,
fxbackward, features), here on tiny CPU builds and against the eager model's numbers.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import TINY_KWARGS
from timm.models._features_fx import GraphExtractNet, create_feature_extractor

import ravit  # noqa: F401  (registers the families)
from ravit.models.fan import FAN

MODELS = sorted(set(timm.list_models("fan*")) | set(timm.list_models("test_fan*")))
IMG = 64


def _tiny(name: str, **kwargs) -> torch.nn.Module:
    """``name`` with its family's tiny overrides (none for the ``test_*`` configs), 10 classes, seeded weights."""
    tiny = {} if name.startswith("test_") else TINY_KWARGS[timm.models.model_entrypoint(name).__module__]
    torch.manual_seed(0)
    return timm.create_model(name, **{"num_classes": 10, **tiny, **kwargs})


def _images(batch: int = 2, h: int = IMG, w: int = IMG) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def plain_executor():
    """TorchScript without its profiling passes (as timm's tests run it): they cost more than these tiny graphs."""
    profiling = torch._C._jit_set_profiling_mode(False)
    yield
    torch._C._jit_set_profiling_mode(profiling)


@pytest.mark.parametrize("name", MODELS)
def test_torchscript_matches_eager(name, one_thread, plain_executor):
    with timm.set_scriptable(True):
        model = _tiny(name).eval()
    scripted = torch.jit.script(model)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=1e-5)
        other = _images(1, IMG + 32, IMG)  # windows, masks and positional encodings follow the input size
        torch.testing.assert_close(scripted(other), model(other), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_fx_graph_matches_eager_forward_and_backward(name, one_thread):
    """timm's FX path (its no-trace registry, ``GraphExtractNet``): the traced graph gives the eager logits exactly in
    eval mode and the eager gradient of every parameter in train mode."""
    model = _tiny(name)
    x = _images()
    graph = GraphExtractNet(model, [model.pretrained_cfg["classifier"]])  # the logits, traced in both modes
    model.eval()  # blocks and stem are FX leaves, so the graph takes eager's path: the fused one without autograd
    with torch.no_grad():
        assert torch.equal(graph(x), model(x))
    assert torch.equal(graph(x).detach(), model(x).detach())

    model.train()
    torch.manual_seed(2)  # the same stochastic-depth draws on both passes (FAN-Swin's default rate is 0.1)
    model(x).mean().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)
    graph.train()(x).mean().backward()  # the graph holds the model's own parameters
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n} through the FX graph"
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-5, atol=1e-7, msg=f"gradient of {n}")


@pytest.mark.parametrize("name", sorted(timm.list_models("test_fan*")))
def test_fx_graph_scripts(name, one_thread, plain_executor):
    """The traced graph itself compiles with TorchScript (timm's test_model_forward_fx_torchscript), one tiny
    configuration per family: the input check stays a Python call, everything else is scripted."""
    model = _tiny(name).eval()
    node = model.pretrained_cfg["classifier"]
    scripted = torch.jit.script(create_feature_extractor(model, [node]))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x)[node], model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_shapes(name, one_thread):
    """One map per ``feature_info`` entry, (B, num_chs, ⌈H/r⌉, ⌈W/r⌉) as NCHW (and (B, h·w, num_chs) as NLC where
    offered); the final output is ``forward_features``; timm's ``features_only`` getter returns the same maps."""
    model = _tiny(name).eval()
    h, w = IMG + 32, IMG
    x = _images(2, h, w)
    levels = list(range(len(model.feature_info)))
    info = timm.models.FeatureInfo(model.feature_info, levels)
    expected = [(2, c, math.ceil(h / r), math.ceil(w / r)) for c, r in zip(info.channels(), info.reduction(),
                                                                         strict=True)]
    getter = _tiny(name, features_only=True, feature_cls="getter", out_indices=tuple(levels)).eval()  # same seed
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        features = getter(x)
    assert [tuple(m.shape) for m in maps] == expected
    for m, f in zip(maps, features, strict=True):
        torch.testing.assert_close(f, m, rtol=0, atol=0)
    if isinstance(model, FAN):  # FAN-ViT and FAN-Hybrid also give tokens; FAN-Swin is timm's Swin (NCHW only)
        with torch.no_grad():
            tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert [tuple(t.shape) for t in tokens] == [(b, hh * ww, c) for b, c, hh, ww in expected]
        for m, t in zip(maps, tokens, strict=True):
            torch.testing.assert_close(t, m.flatten(2).transpose(1, 2), rtol=0, atol=0)
