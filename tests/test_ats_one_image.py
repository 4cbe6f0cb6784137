"""The batch-1 route of static Top-K (``ravit.ats.padded.filled_topk_forward``): one image whose slots stay filled
runs a leaner block that must give what the general padded executor gives — the same kept tokens (ties to the
earlier token), sizes and ids, and the same outputs and gradients — on every host, with and without fusion and the
redundancy discount."""

from __future__ import annotations

import pytest
import torch
from ats_helpers import peaky_vit
from test_ats_hosts import peaky

import ravit.ats.patch as ats_patch
from ravit.ats import apply_ats, trace
from ravit.ats.padded import Slots, filled_topk_forward, padded_block_forward
from ravit.ats.sampling import static_sampler, topk_sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_image_slots(P: int, L: int, C: int, case: str) -> Slots:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, L, C, generator=gen)
    size = torch.ones(1, L)
    if case in ("sized", "ties"):  # tokens that already hold several originals (prefix tokens hold one)
        size[0, P:] = torch.randint(1, 5, (L - P,), generator=gen).float()
    if case == "ties":  # exact copies: equal scores, equal keys (the discount's cover is 1), equal similarities
        x[0, P + 6 : P + 12] = x[0, P + 3]
        x[0, P + 20 :] = x[0, P + 19]
    ids = torch.cat([torch.full((P,), -1), torch.arange(L - P)])[None]
    return Slots(x, size, ids)


@pytest.mark.parametrize("case", ["first_block", "sized", "ties"])
@pytest.mark.parametrize("fuse,redundancy", [(False, 0.0), (True, 0.0), (False, 6.0), (True, 6.0)])
@pytest.mark.parametrize("value_norm", [True, False])
@pytest.mark.parametrize("P,K", [(1, 9), (3, 9), (1, 30)])  # K = 30: every patch token kept, none to fuse
def test_filled_block_equals_the_padded_block(case, fuse, redundancy, value_norm, P, K):
    block = peaky_vit().blocks[2]
    slots = _one_image_slots(P, P + 30, 48, case)
    with torch.no_grad():
        lean = filled_topk_forward(block, slots, P, K, fuse, value_norm=value_norm, redundancy=redundancy)
        general = padded_block_forward(block, slots, P, proportional=fuse, keep_fn=static_sampler(topk_sampling, K),
                                       width=K, fuse=fuse, value_norm=value_norm, redundancy=redundancy)
    assert torch.equal(lean.ids, general.ids)  # the same tokens kept, in the same slots
    assert torch.equal(lean.size, general.size)
    torch.testing.assert_close(lean.x, general.x, atol=1e-5, rtol=0)
    assert lean.x.shape == (1, P + K, 48)
    if fuse:
        assert lean.size.sum() == slots.size.sum()  # every dropped token went somewhere


@pytest.mark.parametrize("redundancy", [0.0, 6.0])
def test_ties_go_to_the_earlier_token(redundancy):
    """Every patch token a copy of one: all scores tie (and with the discount all but the first drop to 0), so Top-K
    keeps the first K patches, and fusion puts every dropped copy into the first kept slot (similarities tie too)."""
    block = peaky_vit().blocks[2]
    P, K, N = 1, 5, 20
    slots = _one_image_slots(P, P + N, 48, "first_block")
    slots = slots._replace(x=torch.cat([slots.x[:, :P], slots.x[:, P : P + 1].expand(1, N, 48)], dim=1))
    with torch.no_grad():
        out = filled_topk_forward(block, slots, P, K, fuse=True, redundancy=redundancy)
    assert out.ids[0].tolist() == [-1, *range(K)]
    assert out.size[0].tolist() == [1.0, 1.0 + N - K] + [1.0] * (K - 1)


def _general(monkeypatch):
    """Force the general padded executor for one image (the lean route's reference)."""
    monkeypatch.setattr(ats_patch, "one_image_route", lambda x: False)


HOSTS = ["vit", "vit_registers", "eva02", "eva_reg_layerscale_unfused", "eva_rope_mixed", "beit", "beit_shared",
         "beit_both"]


def _host(name: str) -> torch.nn.Module:
    if name == "vit":
        return peaky_vit()
    if name == "vit_registers":
        return peaky_vit(reg_tokens=2)
    return peaky(name)


@pytest.mark.parametrize("name", HOSTS)
@pytest.mark.parametrize("fuse,redundancy", [("none", 0.0), ("nearest", 0.0), ("nearest", 6.0)])
def test_one_image_takes_the_lean_route_with_the_general_result(monkeypatch, name, fuse, redundancy):
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = apply_ats(_host(name), blocks=[0, 1, 2, 3], budget=4, sampler="topk", schedule="linear", fuse=fuse,
                      static=True, redundancy=redundancy)
    calls = []

    def counted(*args):
        calls.append(args[3])
        return filled_topk_forward(*args)

    monkeypatch.setattr(ats_patch, "filled_topk_forward", counted)
    lean = trace(model, image, count_gmacs=False)
    assert len(calls) == 4  # every ATS block took the lean route
    monkeypatch.setenv("RAVIT_CPU_KERNELS", "0")  # without them a batch takes the general executor
    two = trace(model, image.expand(2, -1, -1, -1), count_gmacs=False)
    assert len(calls) == 4  # (with them, tests/test_ats_cpu_select.py)
    _general(monkeypatch)
    general = trace(model, image, count_gmacs=False)
    assert torch.equal(lean.kept_tokens, general.kept_tokens)
    for stage in range(4):
        assert torch.equal(lean.kept_indices[stage][0], general.kept_indices[stage][0])
        assert torch.equal(lean.kept_indices[stage][0], two.kept_indices[stage][1])
    torch.testing.assert_close(lean.logits, general.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit", "eva02", "beit"])
def test_one_image_training_gives_the_general_gradients(monkeypatch, name):
    """Fine-tuning at batch 1 (train mode, gradients through the fused tokens) gives the general path's loss and
    gradients."""
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    results = []
    for force_general in (False, True):
        if force_general:
            _general(monkeypatch)
        model = apply_ats(_host(name), blocks=[1, 2, 3], budget=6, sampler="topk", schedule="linear",
                          fuse="nearest", static=True, redundancy=6.0).train()
        loss = model(image).logsumexp(-1).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_lean, grads_lean), (loss_general, grads_general) = results
    torch.testing.assert_close(loss_lean, loss_general, atol=1e-5, rtol=0)
    assert grads_lean.keys() == grads_general.keys() and len(grads_lean) > 0
    for key, grad in grads_lean.items():
        torch.testing.assert_close(grad, grads_general[key], atol=1e-4, rtol=1e-4)


def _static_fused_zoo() -> torch.nn.Module:
    import ravit

    model = ravit.create_model("fmnist_deit_p4", pretrained=True).eval()
    return apply_ats(model, blocks=[0, 1, 2, 3], budget=2, sampler="topk", schedule="linear", fuse="nearest",
                     static=True, redundancy=6.0)


def test_one_image_exports_on_the_general_path_and_matches_the_lean_route(monkeypatch):
    """torch.export of one image keeps the general executor (its stable sort has an ONNX form); the exported
    program equals the eager lean route on another image."""
    x, y = torch.randn(2, 1, 1, 28, 28, generator=torch.Generator().manual_seed(8))
    model = _static_fused_zoo()
    lean_calls = []
    monkeypatch.setattr(ats_patch, "filled_topk_forward", lambda *a: lean_calls.append(1) or filled_topk_forward(*a))
    exported = torch.export.export(model, (x,))
    assert not lean_calls
    with torch.no_grad():
        eager = model(y)
        assert len(lean_calls) == 4
        torch.testing.assert_close(exported.module()(y), eager, atol=1e-5, rtol=0)


@pytest.mark.slow  # ~20 s of compilation
def test_one_image_compiles_the_lean_route_without_a_graph_break():
    torch._dynamo.reset()
    model = _static_fused_zoo()
    x, y = torch.randn(2, 1, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        compiled(x)
        torch.testing.assert_close(compiled(y), model(y), atol=1e-5, rtol=0)
        graph = torch._dynamo.explain(model)(y)
    assert graph.graph_break_count == 0
    # the lean route sorts with torch.sort; the general one, while compiling, with comparisons (stable_sort)
    assert any("sort" in str(node.target) for g in graph.graphs for node in g.graph.nodes
               if node.op in ("call_function", "call_method"))
