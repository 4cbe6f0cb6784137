"""ATS on padded slots with token sizes: the executor of ``static=True`` and ``fuse="nearest"`` (ravit's options
beyond Fayyaz et al., ECCV 2022; see :mod:`ravit.ats.config`), and of every mode on hosts other than timm's ViT.

Every image holds the same number of slots, (B, L, C). A slot carries a *size*: how many original tokens it stands
for (1 for a token, more once dropped tokens were fused into it, 0 for an empty slot). Attention adds log(size) to
each key's logit when fusion is on (proportional attention, ToMe Sec. 3: a slot holding s tokens weighs like s
copies) and masks empty slots out (log 0 = -inf) always, so an image never attends to another image's padding.

An ATS block scores the tokens by the class token's attention times the value norm (ATS Eq. 3, with the same key
bias), samples K of the patch slots, moves the kept ones to the front in their input order, and runs queries, the
projection and the MLP on ``P + width`` slots only. ``width`` is K with ``static=True`` (shapes depend on the
budget alone: export-friendly) and the batch's largest kept count otherwise. With fusion, each dropped token's
block input is averaged into the kept slot whose key is most similar (cosine of the keys averaged over heads),
weighted by size; otherwise it leaves the computation.

What differs between host families (timm ViT, Eva's rotary embedding, BEiT's relative position bias) comes in as
the host's :class:`~ravit.ats.hosts.BlockOps`: positions follow each slot's original patch index (``Slots.ids``),
so a kept token keeps its position wherever its slot moves.

One image under static Top-K (``sampler="topk", static=True``) never has an empty slot, and at batch 1 an ATS
block's cost is its op count: :func:`filled_topk_forward` runs that case with the same result in fewer ops.

Written here rather than on the ragged path of :mod:`ravit.ats.block` because shapes must not depend on the data
for export, and sizes are per slot; the ragged path stays the exact, fastest form of the paper's algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ravit.ats import cpu_select
from ravit.ats.block import Tokens
from ravit.ats.hosts import VIT_OPS, BlockOps
from ravit.ats.sampling import as_dtype, redundancy_discount

__all__ = ["Slots", "filled_topk_forward", "one_image_route", "padded_block_forward", "to_tokens"]

Keep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Slots(NamedTuple):
    """Per-call token state between blocks (never stored on a module).

    x: (B, L, C) tokens, each image's prefix tokens first; empty slots hold finite values that nothing reads.
    size: (B, L) float, original tokens held by each slot; 0 marks an empty slot.
    ids: (B, L) int64 original patch index of each slot's own token (-1 for prefix tokens and empty slots).
    """

    x: torch.Tensor
    size: torch.Tensor
    ids: torch.Tensor


def to_tokens(slots: Slots) -> Tokens:
    """The filled slots as ragged :class:`~ravit.ats.block.Tokens` (for ``trace``): packed rows, counts, ids."""
    filled = slots.size > 0  # (B, L)
    return Tokens(slots.x[filled], filled.sum(dim=1), slots.ids[filled], slots.x.shape[1])


def _key_bias(size: torch.Tensor, proportional: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, L) additive attention bias: log(size) (proportional attention) or 0, and -inf for empty slots."""
    bias = size.log() if proportional else torch.where(size > 0, 0.0, float("-inf"))
    return bias.to(dtype)[:, None, None, :]


def _scores(q_cls: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float,
            value_norm: bool) -> torch.Tensor:
    """(B, L) class-attention x value-norm scores (ATS Eq. 3; the attention alone without ``value_norm``) of
    (B, H, L, D) keys/values under the class token's (B, H or 1, 1, L) attention ``bias`` (empty slots, token sizes,
    and the host's position bias)."""
    B, H, L, D = k.shape
    logits = (q_cls[:, :, None] @ k.transpose(-2, -1)).squeeze(2) * scale + bias[:, :, 0]  # (B, H, L)
    attn = logits.float().softmax(dim=-1).sum(dim=1)  # (B, L)
    if not value_norm:
        return attn
    return attn * torch.linalg.vector_norm(v.transpose(1, 2).reshape(B, L, H * D).float(), dim=-1)


def _flat_rows(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L') per-image row indices into (B, length, ...) -> (B·L',) row indices into the flattened (B·length, ...);
    for one image the row indices themselves."""
    if index.shape[0] == 1:
        return index[0]
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * length).flatten()


def _gather(t: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entries ``index`` (B, L') of ``t`` (B, ..., L, ...) along ``dim``, whole trailing rows each.

    Whole rows go through ``index_select`` (measured ~10x faster on CPU than ``gather`` with an index expanded over
    the row, which reads one index per element): directly for one image, on the flattened (B·L, ...) tensor along
    dim 1; ``gather`` only for other dims of a batch.
    """
    B, width = index.shape
    if B == 1:
        return t.index_select(dim, index[0])
    if dim == 1:
        return t.flatten(0, 1).index_select(0, _flat_rows(index, t.shape[1])).view(B, width, *t.shape[2:])
    index = index.view(B, *([1] * (dim - 1)), width, *([1] * (t.ndim - dim - 1)))
    return t.gather(dim, index.expand(*t.shape[:dim], width, *t.shape[dim + 1:]))


def one_image_route(x: torch.Tensor) -> bool:
    """True when :func:`filled_topk_forward` may run ``x`` (B, L, C): one image, outside ``torch.export`` and
    TorchScript tracing (their graphs keep the general path, whose stable sort ONNX translates); eager and
    ``torch.compile`` take it."""
    return x.shape[0] == 1 and not (torch.compiler.is_exporting() or torch.jit.is_tracing())


def _one_eager_image(keep: torch.Tensor) -> bool:
    """True for one image outside graph capture: its kept slots can come from a ``nonzero`` (a data-dependent
    shape, which export and compile must not see)."""
    return keep.shape[0] == 1 and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def _front_by_rank(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_front` for any batch, with shapes that depend on ``width`` only."""
    n = keep.shape[1]
    rank = torch.arange(n, device=keep.device).expand_as(keep) + (~keep).long() * n  # kept: index; others: after
    order = rank.topk(width, dim=1, largest=False, sorted=True).indices  # (B, width)
    return order, keep.gather(1, order)


def _front(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot order putting each row's kept entries first, in input order: (B, width) indices and their fill mask."""
    if _one_eager_image(keep):  # one image filling the width
        order = keep[0].nonzero().view(1, -1)  # (1, K')
        if order.shape[1] == width:
            return order, keep.new_ones(1, width)
    return _front_by_rank(keep, width)


def _kept_index(keep: torch.Tensor, width: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The slots an ATS block keeps: (B, P + width) indices (the prefix slots, then each row's kept patch slots in
    input order, ``keep`` (B, N) being over the patch slots) and their (B, P + width) fill mask, or None when every
    slot is filled.

    One image whose kept count is the width (always so unless a static K exceeds the tokens left) takes two ops, a
    pad and a ``nonzero``, and needs no mask: at batch 1 an ATS block's cost is its op count.
    """
    if _one_eager_image(keep):
        index = F.pad(keep, (num_prefix, 0), value=True)[0].nonzero().view(1, -1)  # (1, P + K')
        if index.shape[1] == num_prefix + width:
            return index, None
    order, filled = _front_by_rank(keep, width)  # (B, width) each
    prefix = torch.arange(num_prefix, device=keep.device).expand(keep.shape[0], num_prefix)
    return torch.cat([prefix, order + num_prefix], dim=1), F.pad(filled, (num_prefix, 0), value=True)


def _fuse(x_kept: torch.Tensor, size_kept: torch.Tensor, x_in: torch.Tensor, w_in: torch.Tensor,
          metric_in: torch.Tensor, metric_kept: torch.Tensor, num_prefix: int, all_filled: bool = False
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average every weighted input token (``w_in`` > 0: the dropped ones) into its most similar filled kept patch
    slot, by size: returns the new (B, L', C) tokens and (B, L') sizes.

    x_kept (B, L', C), size_kept (B, L'), x_in (B, N, C), w_in (B, N), metric_in (B, N, D), metric_kept (B, L', D);
    the first ``num_prefix`` kept slots (class token, ...) never absorb a token. ``all_filled``: the caller knows
    every kept patch slot is filled (no mask needed).
    """
    with torch.no_grad():  # the matching is a discrete choice
        if all_filled:
            sim = metric_in @ metric_kept[:, num_prefix:].transpose(1, 2)  # (B, N, L' - P)
            target = sim.argmax(dim=-1) + num_prefix  # (B, N)
        else:
            sim = metric_in @ metric_kept.transpose(1, 2)  # (B, N, L')
            absorbs = F.pad(size_kept[:, num_prefix:] > 0, (num_prefix, 0), value=False)  # (B, L')
            target = sim.masked_fill(~absorbs[:, None, :], float("-inf")).argmax(dim=-1)  # (B, N)
    B, width, C = x_kept.shape
    rows = _flat_rows(target, width)  # (B·N,) the flat kept slot of each input token
    total = (x_kept * size_kept[..., None]).reshape(B * width, C)  # (B·L', C), this call's own buffer
    # index_add_ on whole rows, not scatter_add with a row-expanded index (~3x slower on CPU here)
    total = total.index_add_(0, rows, (x_in * w_in[..., None].to(x_in.dtype)).flatten(0, 1)).view(B, width, C)
    size = size_kept.scatter_add(1, target, w_in)  # (B, L')
    return total / size.clamp(min=1e-12)[..., None].to(total.dtype), size


def padded_block_forward(block: nn.Module, slots: Slots, num_prefix: int, proportional: bool,
                         keep_fn: Keep | None = None, width: int | None = None, fuse: bool = False,
                         ops: BlockOps | None = None, value_norm: bool = True, redundancy: float = 0.0) -> Slots:
    """One pre-norm block on padded slots; with ``keep_fn``, an ATS block.

    Args:
        block: a block of a host in :mod:`ravit.ats.hosts`: a ``timm.models.vision_transformer.Block`` with
            ``timm.layers.Attention`` unless ``ops`` says otherwise.
        slots: the input slots.
        num_prefix: prefix tokens (class first) at the front of every image; never dropped.
        proportional: add log(size) to the keys' logits (else only empty slots are masked).
        keep_fn: ``keep_fn(scores, valid) -> keep`` over the patch slots, all (B, L - num_prefix); None keeps all.
        width: patch slots after the block (an ATS block): K for static shapes, None for the largest kept count.
        fuse: average dropped tokens into their most similar kept token instead of dropping them.
        ops: the host's :class:`~ravit.ats.hosts.BlockOps` (positions by ``slots.ids``, attention output, layer
            scale); None for a timm ViT ``Block``.
        value_norm: score by class attention x value norm (Eq. 3); False: the class attention alone (Sec. 4.3).
        redundancy: discount each score by (1 - similarity to a more important token)^``redundancy`` before
            ``keep_fn`` (:func:`~ravit.ats.sampling.redundancy_discount`); 0 leaves the scores as they are.
    """
    ops = VIT_OPS if ops is None else ops
    attn = block.attn
    P = num_prefix

    h = block.norm1(slots.x)  # (B, L, C)
    q, k, v = ops.qkv(block, h, slots.ids)  # (B, H, L, D) each, positions applied
    B, H, L, D = q.shape
    key_bias = _key_bias(slots.size, proportional, q.dtype)  # (B, 1, 1, L)

    x, size, ids = slots
    if keep_fn is not None:
        with torch.no_grad():  # scores and the matching only steer discrete choices
            valid = slots.size[:, P:] > 0  # (B, L - P)
            cls_positions = ops.position_bias(block, slots.ids[:, :1], slots.ids)  # (B, H, 1, L) or None
            cls_bias = _plus(key_bias, cls_positions)  # (B, H|1, 1, L)
            scores = _scores(q[:, :, 0], k, v, cls_bias, attn.scale, value_norm)[:, P:]  # (B, L - P)
            metric = _metric(k) if fuse or redundancy else None  # (B, L, D)
            if redundancy:
                scores = redundancy_discount(scores, metric[:, P:], valid, redundancy)
            keep = keep_fn(scores, valid) & valid
            if width is None:
                width = int(keep.sum(dim=1).max())
            index, filled = _kept_index(keep, width, P)  # (B, P + width) each, or no mask when all are filled
        q = _gather(q, index, dim=2)  # (B, H, P + width, D)
        if getattr(attn, "gate", None) is not None:  # only a gated attention reads the kept tokens' h
            h = _gather(h, index)
        x, ids, size = _gather(x, index), _gather(ids, index), _gather(size, index)  # (B, P + width, ...)
        if filled is not None:  # empty slots: size 0, no patch index
            size, ids = size * filled, ids.masked_fill(~filled, -1)

    bias = _plus(key_bias, ops.position_bias(block, ids, slots.ids))  # (B, H|1, L', L)
    x = _attention_residual(block, ops, q, k, v, bias, h, x)  # (B, L', C)
    if keep_fn is not None and fuse:
        dropped = valid & ~keep  # (B, L - P)
        weight = torch.where(dropped, slots.size[:, P:], 0.0)  # (B, L - P)
        x, size = _fuse(x, size, slots.x[:, P:], weight, metric[:, P:], _gather(metric, index), P,
                        all_filled=filled is None)
    return Slots(_mlp_residual(block, ops, x), size, ids)


def _attention_residual(block: nn.Module, ops: BlockOps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        bias: torch.Tensor | None, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + the attention branch of the kept queries (B, H, L', D) against the (B, H, L, D) keys and values under
    ``bias`` (B, H|1, L', L) or None; ``h`` and ``x`` are the kept slots' (B, L', C) normalised input and input."""
    dropout_p = block.attn.attn_drop.p if block.attn.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, H, L', D)
    o = ops.attn_out(block, o.transpose(1, 2).flatten(2), h)  # (B, L', C)
    return x + block.drop_path1(ops.scale1(block, o))


def _mlp_residual(block: nn.Module, ops: BlockOps, x: torch.Tensor) -> torch.Tensor:
    """x + the block's MLP branch, (B, L', C)."""
    return x + block.drop_path2(ops.scale2(block, block.mlp(block.norm2(x))))


def _metric(k: torch.Tensor) -> torch.Tensor:
    """(B, L, D) unit key averaged over the heads of the (B, H, L, D) keys: fusion's and the discount's similarity."""
    return F.normalize(k.mean(dim=1), dim=-1)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The attention bias a + b (in a's dtype) of a key bias and the host's position bias, either of which may be
    absent (None)."""
    if a is None or b is None:
        return b if a is None else a
    return a + b.to(a.dtype)


def filled_topk_forward(block: nn.Module, slots: Slots, num_prefix: int, width: int, fuse: bool = False,
                        ops: BlockOps | None = None, value_norm: bool = True, redundancy: float = 0.0,
                        kernels: bool = False) -> Slots:
    """An ATS block of static Top-K (``sampler="topk", static=True``) on images whose slots are all filled (one
    image; a batch only with ``kernels``): :func:`padded_block_forward` with ``proportional=fuse`` and the Top-K
    ``keep_fn``, in fewer and smaller ops.

    Static Top-K keeps exactly ``width`` of the filled patch slots, so no slot is ever empty: no validity masks, no
    fill mask, no key mask (only log(size) with fusion), and only the dropped tokens are matched and averaged
    (:func:`_lean_select`, :func:`_lean_fuse`). Written beside the general executor because at batch 1 an ATS
    block's cost is its op count: measured on DeiT-S (fused Top-K, redundancy 6, every block), 61 ops per ATS block
    beyond the zero-overhead ceiling's instead of 103 (no dispatched no-op casts among them), each costing several µs
    in the model on CPU (dispatch and cache misses included). ``torch.compile`` compiles this route; ``torch.export``
    and TorchScript tracing keep the general path (:func:`one_image_route`), whose stable sort ONNX can translate.

    Arguments as :func:`padded_block_forward`; ``width`` <= the patch slots of ``slots``. ``kernels``: run the
    selection and the fusion as two ravit CPU kernels (:mod:`ravit.ats.cpu_select`; the caller asks
    :func:`~ravit.ats.cpu_select.applies` once per forward), the same selection in two ops instead of ~50, for any
    batch; the selection only on a host without position bias (a batch on another host takes the general executor).
    """
    ops = VIT_OPS if ops is None else ops
    P = num_prefix
    x, size, ids = slots  # (B, L, C), (B, L), (B, L); B = 1 without kernels
    h = block.norm1(x)  # (B, L, C)
    q, k, v = ops.qkv(block, h, ids)  # (B, H, L, D) each, positions applied
    if kernels and not ops.positional_bias:
        index, q, x, size, ids, dropped, target, key_bias = cpu_select.topk_select(
            q, k, v, x, size, ids, block.attn.scale, P, width, value_norm, redundancy, fuse)  # kept: (B, P + width)
        bias = key_bias[:, None, None] if fuse else None  # (B, 1, 1, L) proportional attention
    else:
        key_bias = as_dtype(size.log(), q.dtype) if fuse else None  # (1, L)
        index, q, x, size, ids, dropped, target = _lean_select(block, ops, q, k, v, slots, key_bias, P, width,
                                                               value_norm, redundancy, fuse)
        bias = _plus(key_bias, ops.position_bias(block, ids, slots.ids))  # (1, L), (1, H, P + width, L) or None
    if getattr(block.attn, "gate", None) is not None:  # only a gated attention reads the kept tokens' h
        h = _gather(h, index.view(h.shape[0], -1))
    x = _attention_residual(block, ops, q, k, v, bias, h, x)  # (B, P + width, C)
    if fuse:
        x, size = (cpu_select.fuse_nearest if kernels else _lean_fuse)(x, size, slots.x, slots.size, dropped, target)
    return Slots(_mlp_residual(block, ops, x), size, ids)


def _lean_select(block: nn.Module, ops: BlockOps, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: Slots,
                 key_bias: torch.Tensor | None, num_prefix: int, width: int, value_norm: bool, redundancy: float,
                 fuse: bool) -> tuple[torch.Tensor, ...]:
    """The selection of :func:`filled_topk_forward` in torch ops, any host: what
    :func:`~ravit.ats.cpu_select.topk_select` returns (``key_bias`` (1, L) or None given, not returned).

    The kept slots are the first ``width`` of one stable sort (ties to the earlier token, as
    :func:`~ravit.ats.sampling.topk_sampling`), put back in input order; the rest of that sort are the dropped
    tokens, so fusion matches only those (not every token with weight 0, and no pass over every kept slot)."""
    P = num_prefix
    with torch.no_grad():  # scores and the matching only steer discrete choices
        cls_bias = _plus(key_bias, ops.position_bias(block, slots.ids[:, :1], slots.ids))  # (1, L), (1, H, 1, L), None
        scores = _image_scores(q, k, v, cls_bias, block.attn.scale, value_norm)[P:]  # (N,) N = L - P
        patches = _metric(k)[0, P:] if fuse or redundancy else None  # (N, D)
        if redundancy:
            scores = redundancy_discount(scores, patches, None, redundancy)
        ranked = torch.sort(scores, descending=True, stable=True).indices  # (N,) best first, ties to the earlier
        kept, dropped = ranked[:width].sort().values, ranked[width:]  # (width,) in input order, (N - width,)
        index = torch.cat((torch.arange(P, device=kept.device), kept + P))  # (P + width,)
        target = dropped
        if fuse:  # each dropped token's slot: its most similar kept token
            sim = patches.index_select(0, dropped) @ patches.index_select(0, kept).T  # (N - width, width)
            target = sim.max(dim=1).indices + P  # (N - width,)
    kept_slots = (t.index_select(1, index) for t in slots)
    return index, q.index_select(2, index), *kept_slots, dropped + P, target


def _lean_fuse(x: torch.Tensor, size: torch.Tensor, x_in: torch.Tensor, size_in: torch.Tensor, dropped: torch.Tensor,
               target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~ravit.ats.cpu_select.fuse_nearest` in torch ops (autograd included): the block input's ``dropped``
    slots averaged by size into their ``target`` slots of the kept (1, W, C) ``x``; returns x and the (1, W) sizes.

    The size-weighted average (s x + sum w_j x_j) / (s + sum w_j) is written as x + sum (w_j / S)(x_j - x), so that
    only the dropped tokens' rows are computed (no pass over every kept slot)."""
    weight = size_in[0].index_select(0, dropped)  # (M,) the dropped tokens' sizes
    size = size.index_add(1, target, weight[None])  # (1, W) sizes after the merge
    pull = as_dtype(weight / size[0].index_select(0, target), x.dtype)[:, None]  # (M, 1)
    return x.index_add_(1, target, (x_in.index_select(1, dropped) - x.index_select(1, target)) * pull), size


def _image_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float,
                  value_norm: bool) -> torch.Tensor:
    """:func:`_scores` of one image, (L,), from its (1, H, L, D) q, k, v and (1, L) or (1, H, 1, L) class-row bias or
    None: batched matrix products on (H, ...) views, one op each."""
    q_cls, keys = q[0, :, :1], k[0].transpose(1, 2)  # (H, 1, D), (H, D, L)
    if bias is None:
        logits = torch.bmm(q_cls, keys) * scale  # (H, 1, L)
    else:
        logits = torch.baddbmm(as_dtype(bias[0], q.dtype), q_cls, keys, alpha=scale)  # (H, 1, L)
    attn = as_dtype(logits, torch.float32).softmax(dim=-1).sum(dim=0)[0]  # (L,)
    if not value_norm:
        return attn
    return attn * torch.linalg.vector_norm(as_dtype(v[0], torch.float32), dim=(0, 2))  # over all channels, as Eq. 3's
