"""ATS's one-image kernels (ravit.ats.cpu_select): ``ravit::topk_select`` keeps, gathers and matches exactly what the
torch ops of the lean route do, ``ravit::fuse_nearest`` averages as they do, and a model takes them only for fp32
CPU inference outside autocast, graph capture and dispatch modes, with the torch route's results."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ats_helpers import peaky_vit
from test_ats_hosts import peaky
from torch.utils.flop_counter import FlopCounterMode

import ravit.ats.padded as padded
from ravit.ats import apply_ats, cpu_select, trace
from ravit.ats.hosts import VIT_OPS
from ravit.ats.padded import Slots, filled_topk_forward

pytestmark = pytest.mark.usefixtures("cpu_kernels_built", "one_thread")


def _inputs(H: int, L: int, D: int, P: int, case: str, seed: int = 0):
    """q, k, v as strided views of a fused (1, L, 3, H, D) projection (timm's layout), and the slots."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(1, L, 3, H, D, generator=gen)
    size = torch.ones(1, L)
    if case in ("sized", "ties"):
        size[0, P:] = torch.randint(1, 5, (L - P,), generator=gen).float()
    if case == "ties":  # exact copies: equal scores and keys (the discount's cover is 1), equal similarities
        qkv[0, P + 6 : P + 12] = qkv[0, P + 3]
        qkv[0, P + 20 :] = qkv[0, P + 19]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (1, H, L, D) each, unit stride along D only
    x = torch.randn(1, L, 4 * D, generator=gen)
    if case == "ties":
        x[0, P + 6 : P + 12] = x[0, P + 3]
    ids = torch.cat([torch.full((P,), -1), torch.arange(L - P)])[None]
    return q, k, v, Slots(x, size, ids)


def _torch_select(q, k, v, slots, P, width, value_norm, redundancy, fuse):
    block = SimpleNamespace(attn=SimpleNamespace(scale=q.shape[-1] ** -0.5))
    key_bias = slots.size.log() if fuse else None
    return padded._lean_select(block, VIT_OPS, q, k, v, slots, key_bias, P, width, value_norm, redundancy, fuse)


SHAPES = [(3, 31, 16, 1, 9), (6, 197, 64, 1, 98), (2, 40, 12, 3, 20), (4, 29, 24, 1, 28), (1, 130, 40, 5, 64)]


@pytest.mark.parametrize("case,H,L,D,P,K", [(case, *shape) for case in ("first_block", "sized", "ties")
                                            for shape in SHAPES if case != "ties" or shape[1] <= 64])
@pytest.mark.parametrize("fuse,redundancy", [(False, 0.0), (True, 0.0), (False, 6.0), (True, 6.0), (True, 1.5)])
@pytest.mark.parametrize("value_norm", [True, False])
def test_kernel_selection_equals_the_torch_ops(case, H, L, D, P, K, fuse, redundancy, value_norm):
    """Head widths and token counts on and off the vector width (tails), several prefix tokens, the two threads'
    split of the discount (L >= 96), and K = N - 1. Exact copies only in short sequences: over ~100 copies torch's
    own matrix product rounds equal columns differently by position (its tail columns), so only the kernel's ties
    are exact there (test_ties_go_to_the_earlier_token)."""
    q, k, v, slots = _inputs(H, L, D, P, case)
    with torch.inference_mode():
        *ours, log_size = cpu_select.topk_select(q, k, v, *slots, q.shape[-1] ** -0.5, P, K, value_norm, redundancy,
                                                 fuse)
        ref = _torch_select(q, k, v, slots, P, K, value_norm, redundancy, fuse)
    ours[0] = ours[0][0]  # one image's (P + K,) index
    for name, a, b in zip(["index", "q", "x", "size", "ids"], ours[:5], ref[:5], strict=True):
        assert torch.equal(a, b), name  # the same choices, and gathers copy exactly
    (dropped, target), (ref_dropped, ref_target) = (t[0] for t in ours[5:]), ref[5:]
    if fuse:  # the same dropped tokens, each into the same kept slot (their order, by rank, may differ among the
        # tokens whose discounted scores round to 0 or a denormal)
        order, ref_order = dropped.argsort(), ref_dropped.argsort()
        assert torch.equal(dropped[order], ref_dropped[ref_order])
        assert torch.equal(target[order], ref_target[ref_order])
    else:
        assert dropped.numel() == target.numel() == 0
    assert ours[1].is_contiguous() and ours[1].shape == (1, H, P + K, D)
    if fuse:
        torch.testing.assert_close(log_size, slots.size.log(), rtol=0, atol=1e-6)
    else:
        assert log_size.numel() == 0


@pytest.mark.parametrize("L,D", [(21, 16), (197, 64)])
@pytest.mark.parametrize("redundancy", [0.0, 6.0])
def test_ties_go_to_the_earlier_token(L, D, redundancy):
    """Every patch token a copy of one: scores tie (with the discount all but the first drop to 0), so the first K
    patches are kept and every dropped copy matches the first kept slot."""
    q, k, v, slots = _inputs(2, L, D, 1, "first_block")
    copies = torch.tensor([1, L - 1])
    q, k, v = (t[:, :, :2].repeat_interleave(copies, dim=2) for t in (q, k, v))
    x = slots.x[:, :2].repeat_interleave(copies, dim=1)
    with torch.inference_mode():
        index, *_, dropped, target, _ = cpu_select.topk_select(q, k, v, x, slots.size, slots.ids, 0.25, 1, 5, True,
                                                                redundancy, True)
    assert index.tolist() == [list(range(6))]
    assert dropped.tolist() == [list(range(6, L))] and target.tolist() == [[1] * (L - 6)]


@pytest.mark.parametrize("C", [48, 384, 50])
def test_fusion_kernel_equals_the_torch_ops(C):
    gen = torch.Generator().manual_seed(C)
    W, L, M = 12, 40, 25
    x, x_in = torch.randn(1, W, C, generator=gen), torch.randn(1, L, C, generator=gen)
    size = torch.randint(1, 4, (1, W), generator=gen).float()
    size_in = torch.randint(1, 6, (1, L), generator=gen).float()
    dropped = torch.randperm(L, generator=gen)[:M]
    target = torch.randint(1, W, (M,), generator=gen)  # repeated targets: several tokens into one slot
    with torch.inference_mode():
        ref_x, ref_size = padded._lean_fuse(x.clone(), size, x_in, size_in, dropped, target)
        buffer = x.clone()
        ours_x, ours_size = cpu_select.fuse_nearest(buffer, size, x_in, size_in, dropped, target)
    assert ours_x.data_ptr() == buffer.data_ptr()  # in place
    assert torch.equal(ours_size, ref_size)
    torch.testing.assert_close(ours_x, ref_x, rtol=0, atol=1e-6)
    untouched = torch.ones(W, dtype=torch.bool)
    untouched[target] = False
    assert torch.equal(ours_x[0, untouched], x[0, untouched])


def _kernel_calls(monkeypatch) -> list[str]:
    calls = []
    for name in ("topk_select", "fuse_nearest"):
        original = getattr(cpu_select, name)
        monkeypatch.setattr(cpu_select, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


def _fused_model(name: str = "vit") -> torch.nn.Module:
    host = peaky_vit() if name == "vit" else peaky(name)
    return apply_ats(host.eval(), blocks=[0, 1, 2, 3], budget=4, sampler="topk", schedule="linear", fuse="nearest",
                     static=True, redundancy=6.0)


@pytest.mark.parametrize("name", ["vit", "eva02"])
@pytest.mark.parametrize("batch", [1, 3])
def test_inference_takes_the_kernels_with_the_torch_route_result(monkeypatch, name, batch):
    """The kernels' kept tokens and logits are those of the torch ops: the lean route's for one image, the general
    executor's for a batch (which takes it without the kernels)."""
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    model = _fused_model(name)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    calls = _kernel_calls(monkeypatch)
    ours = trace(model, images, count_gmacs=False)
    assert calls == ["topk_select", "fuse_nearest"] * 4
    monkeypatch.setenv("RAVIT_CPU_KERNELS", "0")
    ref = trace(model, images, count_gmacs=False)
    assert len(calls) == 8  # nothing ran them with the switch off
    torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=1e-5)
    for stage in range(4):
        for b in range(batch):
            assert torch.equal(ours.kept_indices[stage][b], ref.kept_indices[stage][b])


def test_the_kernels_stay_out_of_autograd_autocast_dispatch_modes_and_batches(monkeypatch):
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    model = _fused_model()
    image = torch.randn(1, 3, 32, 32)
    calls = _kernel_calls(monkeypatch)
    model(image)  # autograd on
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(image)
        with FlopCounterMode(display=False):  # GMACs count the torch route's matrix products
            model(image)
    assert calls == []
    with torch.no_grad():
        model(image)
        assert len(calls) == 8
        model(image.expand(2, -1, -1, -1))  # a batch too
        assert len(calls) == 16


@pytest.mark.parametrize("fuse,redundancy", [(False, 0.0), (True, 6.0)])
def test_a_batch_in_the_kernel_is_each_image_alone(fuse, redundancy):
    """Images of different sizes and token states in one call: each image's selection and fusion as alone."""
    images = [_inputs(4, 61, 24, 1, case, seed) for seed, case in enumerate(["first_block", "sized", "ties"])]
    q, k, v = (torch.cat([im[i] for im in images]) for i in range(3))
    slots = [torch.cat([im[3][i] for im in images]) for i in range(3)]
    with torch.inference_mode():
        batch = cpu_select.topk_select(q, k, v, *slots, 0.2, 1, 30, True, redundancy, fuse)
        x = torch.randn(3, 31, 96)
        fused = cpu_select.fuse_nearest(x.clone(), batch[3], slots[0], slots[1], batch[5], batch[6]) if fuse else None
        for b, (qb, kb, vb, slots_b) in enumerate(images):
            alone = cpu_select.topk_select(qb, kb, vb, *slots_b, 0.2, 1, 30, True, redundancy, fuse)
            for a, c in zip(alone, batch, strict=True):
                assert torch.equal(a, c[b : b + 1]) if c.numel() else a.numel() == 0
            if fuse:
                alone_x, alone_size = cpu_select.fuse_nearest(x[b : b + 1].clone(), alone[3], slots_b[0],
                                                              slots_b[1], alone[5], alone[6])
                assert torch.equal(alone_x, fused[0][b : b + 1]) and torch.equal(alone_size, fused[1][b : b + 1])


def test_a_host_with_position_bias_selects_in_torch_and_fuses_in_the_kernel(monkeypatch):
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    model = _fused_model("beit")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    calls = _kernel_calls(monkeypatch)
    with torch.inference_mode():
        ours = model(image)
    assert calls == ["fuse_nearest"] * 4
    monkeypatch.setenv("RAVIT_CPU_KERNELS", "0")
    with torch.inference_mode():
        torch.testing.assert_close(ours, model(image), rtol=0, atol=1e-5)


def test_gmacs_do_not_depend_on_the_kernels(monkeypatch):
    model = _fused_model()
    image = torch.randn(1, 3, 32, 32)
    monkeypatch.delenv("RAVIT_CPU_KERNELS", raising=False)
    with_kernels = trace(model, image).gmacs
    monkeypatch.setenv("RAVIT_CPU_KERNELS", "0")
    assert torch.equal(with_kernels, trace(model, image).gmacs)


def test_filled_block_with_kernels_equals_the_padded_block():
    block = peaky_vit().blocks[2]
    _, _, _, slots = _inputs(3, 31, 16, 1, "sized")
    slots = slots._replace(x=slots.x[..., :48].contiguous())
    with torch.inference_mode():
        ours = filled_topk_forward(block, slots, 1, 9, True, redundancy=6.0, kernels=True)
        ref = filled_topk_forward(block, slots, 1, 9, True, redundancy=6.0, kernels=False)
    assert torch.equal(ours.ids, ref.ids) and torch.equal(ours.size, ref.size)
    torch.testing.assert_close(ours.x, ref.x, rtol=0, atol=1e-5)


def test_kernels_refuse_bad_arguments():
    q, k, v, slots = _inputs(2, 21, 16, 1, "first_block")
    args = (0.25, 1)
    with pytest.raises(RuntimeError, match="width <= 20"):
        cpu_select.topk_select(q, k, v, *slots, *args, 21, True, 0.0, False)
    with pytest.raises(RuntimeError, match="1 <= width"):
        cpu_select.topk_select(q, k, v, *slots, *args, 0, True, 0.0, False)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        cpu_select.topk_select(q.double(), k, v, *slots, *args, 5, True, 0.0, False)
    with pytest.raises(RuntimeError, match="unit stride along D"):
        cpu_select.topk_select(q, k.transpose(2, 3), v, *slots, *args, 5, True, 0.0, False)
    with pytest.raises(RuntimeError, match="ids must be"):
        cpu_select.topk_select(q, k, v, slots.x, slots.size, slots.ids.int(), *args, 5, True, 0.0, False)
    x = torch.zeros(1, 5, 8)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_select.fuse_nearest(x, torch.ones(1, 5), torch.zeros(1, 7, 8), torch.ones(1, 7), torch.tensor([7]),
                                torch.tensor([1]))
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_select.fuse_nearest(x, torch.ones(1, 5), torch.zeros(1, 7, 8), torch.ones(1, 7), torch.tensor([2]),
                                torch.tensor([5]))
