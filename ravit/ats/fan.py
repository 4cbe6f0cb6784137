"""Token reduction on FAN (Zhou et al., ICML 2022): the executor that lets ATS (Fayyaz et al., ECCV 2022) and ToMe
(Bolya et al., ICLR 2023) run on FAN-ViT and FAN-Hybrid, which neither paper covers.

A FAN block differs from a ViT block in three ways that matter here (FAN Sec. 3.2):

- **No class token in the blocks.** The class token joins only in the two class-attention blocks after the last FAN
  block, so ATS's score (the class token's attention times the value norm, ATS Eq. 3) has no class row to read.
  ravit scores a token by the attention it *receives*, averaged over the queries (each query weighted by how many
  tokens it stands for) and summed over heads, times its value norm: the importance of Learned Token Pruning (Kim et
  al., KDD 2022) with ATS's value-norm factor. The softmax probabilities are computed explicitly in a sampling block
  (the kept queries' rows are then reused for the output, so nothing is computed twice).
- **A depthwise conv on the token grid** inside channel processing's MLP. Tokens stay in slots (padded per image,
  empty slots masked), and every grid position stays held by one token: its own while kept, the nearest kept token
  on the grid once dropped (with ``fuse``, the kept token it was averaged into; after a ToMe merge, the merged
  token). The convs read each position's holder's value, and a token's conv output is the mean over the positions
  it holds, as ToMe for Stable Diffusion (Bolya & Hoffman, CVPRW 2023) unmerges tokens around convolutions. Leaving
  dropped positions empty (zero, like the image border) cost 5 points more on the zoo FAN at the same budget (Top-K,
  0.9 per block from block 1: 84.4% against 89.4%, dense 90.6%, 500 test images). With every token kept this is the
  dense block. Only the two thin depthwise convs (9 MACs per channel and position) still see the whole grid; the
  linear maps, which hold nearly all of a block's MACs, run on the kept slots only.
- **Channel attention** (ECA) takes a softmax over the tokens per channel: empty slots are masked out of it, and
  with token sizes a token counts as many times as the tokens it holds, as proportional attention does for keys.

The class-attention blocks then let the class token attend to the kept tokens only (empty slots masked).
In training, channel processing's BatchNorm computes batch statistics over the whole grid, empty positions
included; inference uses the running statistics and is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ravit.ats.padded import _front, _gather, _key_bias
from ravit.ats.sampling import redundancy_discount
from ravit.layers.channel_processing import ChannelProcessing, channel_attention_gate
from ravit.layers.dwconv import map_to_tokens, tokens_to_map
from ravit.models.fan import FAN

__all__ = [
    "GridSlots", "channel_forward", "class_attention", "dense_slots", "fan_check", "mixing_forward",
    "received_attention_scores",
]

Keep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GridSlots(NamedTuple):
    """Per-call token state between FAN blocks (never stored on a module).

    x: (B, L, C) tokens; empty slots hold finite values that nothing reads.
    size: (B, L) float, the tokens each slot stands for (1; more once fused or merged, the weight of proportional
        attention); 0 marks an empty slot.
    ids: (B, L) int64 grid index of each slot's own token (-1 for an empty slot).
    owner: (B, G) int64 slot holding each of the G grid positions (for the depthwise convs).
    """

    x: torch.Tensor
    size: torch.Tensor
    ids: torch.Tensor
    owner: torch.Tensor


def dense_slots(x: torch.Tensor) -> GridSlots:
    """The (B, G, C) tokens of a full grid as slots: every slot filled, slot j holding grid position j."""
    B, G, _ = x.shape
    ids = torch.arange(G, device=x.device).expand(B, G)
    return GridSlots(x, x.new_ones(B, G, dtype=torch.float32), ids, ids)


def fan_check(model: nn.Module, first: int) -> str | None:
    """Why ``model`` cannot reduce tokens from FAN block ``first`` on, or None (a FAN-ViT or FAN-Hybrid that can)."""
    if not isinstance(model, FAN):
        return f"got {type(model).__name__}"
    if model.global_pool != "token" or not len(model.cls_attn_blocks):
        return (f"the FAN model must classify from its class-attention head (global_pool='token'), got "
                f"global_pool={model.global_pool!r} with {len(model.cls_attn_blocks)} class-attention blocks")
    for i, block in enumerate(model.blocks):
        if i >= first and not isinstance(block.mlp, ChannelProcessing):
            return f"FAN block {i} uses the SE-MLP ablation, not channel processing"
        if i >= first and block.downsample is not None:
            return (f"FAN block {i} downsamples the token grid (FAN-Hybrid-XL's width change), which needs every "
                    f"token; reduce tokens only after the last downsampling block")
    return None


def received_attention_scores(probs: torch.Tensor, query_size: torch.Tensor, v: torch.Tensor,
                              value_norm: bool) -> torch.Tensor:
    """(B, L) score of every slot: the attention it receives, averaged over the queries weighted by their size and
    summed over heads, times the value norm over all heads' channels (ATS Eq. 3 with received attention in place of
    the class row; Kim et al., KDD 2022).

    probs (B, H, L, L) attention probabilities (0 towards empty slots), query_size (B, L) (0 for empty slots),
    v (B, H, L, D).
    """
    B, H, L, D = v.shape
    weight = query_size / query_size.sum(dim=1, keepdim=True)  # (B, L)
    received = (probs.float().sum(dim=1) * weight[:, :, None]).sum(dim=1)  # (B, L)
    if not value_norm:
        return received
    return received * torch.linalg.vector_norm(v.transpose(1, 2).reshape(B, L, H * D).float(), dim=-1)


def _nearest_kept(slots: GridSlots, keep: torch.Tensor, hw: tuple[int, int], metric: torch.Tensor | None
                  ) -> torch.Tensor:
    """(B, L): for every input slot, the kept input slot that takes over its grid positions: itself when kept; for
    a dropped one the nearest kept token on the grid (squared distance of the slots' own positions; the first in
    slot order on ties), or, with ``metric`` (B, L, D) unit vectors, the most similar kept token."""
    if metric is not None:
        closeness = metric @ metric.transpose(1, 2)  # (B, L, L) cosine similarity
    else:
        ids = slots.ids.clamp(min=0)
        row, col = ids // hw[1], ids % hw[1]  # (B, L)
        closeness = -((row[:, :, None] - row[:, None, :]) ** 2 + (col[:, :, None] - col[:, None, :]) ** 2).float()
    target = closeness.masked_fill(~keep[:, None, :], float("-inf")).argmax(dim=-1)  # (B, L)
    return torch.where(keep, torch.arange(keep.shape[1], device=keep.device), target)


def _new_owner(owner: torch.Tensor, target: torch.Tensor, index: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """Owners after sampling: each position goes to its slot's ``target`` (B, L), renumbered by the new slot order
    ``index`` (B, L') with ``filled`` marking real tokens."""
    B, L = target.shape
    new = torch.arange(index.shape[1], device=owner.device).expand(B, -1)
    slot_of = torch.zeros((B, L + 1), dtype=torch.long, device=owner.device)  # one spare column for padding
    slot_of.scatter_(1, torch.where(filled, index, L), new)  # input slot -> new slot
    return slot_of.gather(1, target.gather(1, owner))  # (B, G)


def _absorb(x: torch.Tensor, size: torch.Tensor, x_in: torch.Tensor, size_in: torch.Tensor, dropped: torch.Tensor,
            to: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each ``dropped`` input token (x_in (B, L, C), size_in (B, L)) into new slot ``to`` (B, L) of the kept
    tokens x (B, L', C), size (B, L'), weighted by size: the new (B, L', C) tokens and (B, L') sizes."""
    weight = torch.where(dropped, size_in, 0.0)  # (B, L)
    to = to.clamp(min=0)
    total = (x * size[..., None].to(x.dtype)).scatter_add(
        1, to[..., None].expand(-1, -1, x.shape[-1]), x_in * weight[..., None].to(x.dtype))  # (B, L', C)
    size = size.scatter_add(1, to, weight)
    return total / size.clamp(min=1e-12)[..., None].to(total.dtype), size


def mixing_forward(block: nn.Module, slots: GridSlots, hw: tuple[int, int], keep_fn: Keep | None = None,
                   width: int | None = None, proportional: bool = False, value_norm: bool = True,
                   fuse: bool = False, redundancy: float = 0.0) -> tuple[GridSlots, torch.Tensor]:
    """Token mixing of a FAN block (x + γ1·MHSA(LN1 x)) on slots; with ``keep_fn``, an ATS sampling step.

    Args:
        block: a ``ravit.models.fan.FANBlock``.
        slots: the input slots.
        hw: the token grid (H, W).
        keep_fn: ``keep_fn(scores, valid) -> keep``, (B, L) each; None keeps every token.
        width: slots after sampling (K with static shapes), None for the batch's largest kept count.
        proportional: add log(size) to each key's logit (ToMe Sec. 3); empty slots are masked out always.
        value_norm: score by received attention x value norm; False: received attention alone.
        fuse: average each dropped token into its most similar kept token (cosine of the keys averaged over heads)
            and hand it its positions; otherwise dropped tokens leave and the nearest kept token on the grid holds
            their positions.
        redundancy: discount each score by (1 - similarity to a more important token)^``redundancy`` before
            ``keep_fn`` (:func:`~ravit.ats.sampling.redundancy_discount`); 0 leaves the scores as they are.

    Returns:
        The new slots (fewer after sampling) and the (B, H, L, D) keys of the *input* slots (ToMe's metric).
    """
    attn = block.attn
    H = attn.num_heads
    h = block.norm1(slots.x)  # (B, L, C)
    B, L, C = h.shape
    q = attn.q(h).view(B, L, H, C // H).transpose(1, 2)  # (B, H, L, D)
    k, v = attn.kv(h).view(B, L, 2, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, D) each
    bias = _key_bias(slots.size, proportional, q.dtype)  # (B, 1, 1, L)
    full = not proportional and bool((slots.size > 0).all())
    x, size, ids, owner = slots
    if keep_fn is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if full else bias,
                                           dropout_p=attn.attn_drop.p if attn.training else 0.0)  # (B, H, L, D)
    else:
        probs = ((q * attn.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)  # (B, H, L, L)
        with torch.no_grad():  # the scores only steer a discrete choice
            valid = slots.size > 0
            scores = received_attention_scores(probs, slots.size, v, value_norm)  # (B, L)
            metric = F.normalize(k.mean(dim=1), dim=-1) if fuse or redundancy else None  # (B, L, D)
            if redundancy:
                scores = redundancy_discount(scores, metric, valid, redundancy)
            keep = keep_fn(scores, valid) & valid  # (B, L)
            if width is None:
                width = int(keep.sum(dim=1).max())
            index, filled = _front(keep, width)  # (B, width) each
            target = _nearest_kept(slots, keep, hw, metric if fuse else None)  # (B, L) input slot -> kept input slot
            owner = _new_owner(owner, target, index, filled)  # (B, G)
        probs = probs.gather(2, index[:, None, :, None].expand(-1, H, -1, L))  # (B, H, width, L): kept queries
        o = attn.attn_drop(probs) @ v  # (B, H, width, D)
        x, ids = _gather(x, index), _gather(ids, index).masked_fill(~filled, -1)
        size = _gather(size, index) * filled
    o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, -1, C)))  # (B, L', C)
    x = x + block.drop_path(block.gamma1 * o)
    if keep_fn is not None and fuse:
        to = _new_owner(target, target, index, filled)  # (B, L): the new slot each input slot went to
        x, size = _absorb(x, size, slots.x, slots.size, valid & ~keep, to)
    return GridSlots(x, size, ids, owner), k


def _grid_mlp(mlp: nn.Module, z: torch.Tensor, hw: tuple[int, int], slots: GridSlots) -> torch.Tensor:
    """FAN's DWConvMlp (fc1 -> h + γ·DWConv(h) -> fc2) with the linears on the slots and the depthwise convs on the
    grid: each position reads its holder's value, each slot gets the mean of its positions' outputs."""
    h = mlp.fc1(z)  # (B, L, E)
    B, L, E = h.shape
    conv = mlp.dwconv
    grid = tokens_to_map(_gather(h, slots.owner).contiguous(), hw)  # (B, E, H, W)
    y = map_to_tokens(conv.conv2(conv.bn(conv.act(conv.conv1(grid))))) * mlp.gamma  # (B, G, E)
    index = slots.owner[..., None]  # (B, G, 1)
    y = h.new_zeros(B, L, E).scatter_add(1, index.expand(-1, -1, E), y)  # (B, L, E)
    count = h.new_zeros(B, L, 1).scatter_add(1, index, torch.ones_like(index, dtype=h.dtype))  # positions held
    y = mlp.drop(y / count.clamp(min=1))
    return mlp.drop(mlp.fc2(y + h if mlp.dwconv_residual else y))  # (B, L, C)


def channel_forward(block: nn.Module, slots: GridSlots, hw: tuple[int, int], proportional: bool = False) -> GridSlots:
    """Channel processing of a FAN block (x + γ2·ECA(LN2 x), FAN Eq. 7) on slots of an (H, W) grid."""
    cp = block.mlp
    z = block.norm2(slots.x)  # (B, L, C)
    bias = _key_bias(slots.size, proportional, z.dtype)[:, 0, 0, :, None]  # (B, L, 1): -inf for empty slots
    gate = cp.attn_drop(channel_attention_gate(cp.q(z) + bias, z + bias, cp.temperature))  # (B, 1, C)
    v = cp.norm_v(_grid_mlp(cp.mlp_v, z, hw, slots))  # (B, L, C)
    return slots._replace(x=slots.x + block.drop_path(block.gamma2 * v * gate))


def _class_attention_block(block: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """timm's XCiT ``ClassAttentionBlock`` (CaiT-style, as FAN uses it) with an additive key ``bias`` (B, 1, 1, N)."""
    attn = block.attn
    xn = block.norm1(x)  # (B, N, C)
    B, N, C = xn.shape
    H = attn.num_heads
    q = attn.q(xn[:, :1]).view(B, 1, H, C // H).transpose(1, 2)  # (B, H, 1, D)
    k = attn.k(xn).view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
    v = attn.v(xn).view(B, N, H, C // H).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    cls = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, 1, C)))  # (B, 1, C)
    x = x + block.drop_path1(block.gamma1 * torch.cat([cls, xn[:, 1:]], dim=1))
    x = block.norm2(x) if block.tokens_norm else torch.cat([block.norm2(x[:, :1]), x[:, 1:]], dim=1)
    cls = block.gamma2 * block.mlp(x[:, :1])  # (B, 1, C)
    return x + block.drop_path2(torch.cat([cls, x[:, 1:]], dim=1))


def class_attention(model: FAN, slots: GridSlots, proportional: bool = False) -> torch.Tensor:
    """The class token over the slots through the class-attention blocks, then the final norm: (B, 1 + L, C), zero
    in empty slots (what ``FAN.forward_features`` returns, on the kept tokens)."""
    B = slots.x.shape[0]
    x = torch.cat([model.cls_token.expand(B, -1, -1), slots.x], dim=1)  # (B, 1 + L, C)
    size = F.pad(slots.size, (1, 0), value=1.0)  # (B, 1 + L)
    bias = _key_bias(size, proportional, x.dtype)  # (B, 1, 1, 1 + L)
    for block in model.cls_attn_blocks:
        x = _class_attention_block(block, x, bias)
    return model.norm(x) * (size > 0)[..., None].to(x.dtype)
