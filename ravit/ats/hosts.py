"""The timm model families ATS runs on, as small adapters beside the algorithm (Fayyaz et al., ECCV 2022, Sec. 3:
the sampler needs only a class token whose attention row scores the patch tokens, whatever encodes positions).

What differs between hosts is kept here; :mod:`ravit.ats.padded` (the executor) and :mod:`ravit.ats.patch` (the
model-level forward) stay the same for all of them. A :class:`Host` says how a family's ``forward_features`` starts
(tokens and per-call position data), how its blocks run densely before the first ATS block and which
:class:`BlockOps` its blocks need on padded slots, where a slot may hold any original patch:

- ``VisionTransformer`` (timm ``Block`` / ``Attention``): positions are added once at the input; nothing to track.
- ``Eva`` (EVA-02 and the other rotary ViTs built from ``EvaBlock`` / ``EvaAttention``): queries and keys of patch
  tokens are rotated by the rotary embedding of the token's *original* patch index (``Slots.ids``); prefix tokens
  are not rotated, as in timm.
- ``Beit`` (``Block`` / ``Attention`` with relative position bias per block and/or shared by all blocks): each
  (query, key) pair gets the bias of its original positions, looked up in the bias table through timm's
  ``relative_position_index`` at (1 + query id, 1 + key id); index 0 is the class token, which timm gives three
  table rows of its own (class to patch, patch to class, class to class).

With ``fuse="nearest"`` (ravit's option, not the paper's) a slot that absorbed dropped tokens keeps the position of
its own kept token: the absorbed tokens' positions are not represented.

Ops hold no module state: modules come in as arguments, per-call data (a rotary table) as a field of an object
built for one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from timm.layers import Attention, apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

__all__ = ["BEIT", "EVA", "HOSTS", "VIT", "VIT_OPS", "BlockOps", "Host", "host_of"]


class BlockOps(Protocol):
    """What one host's pre-norm block computes differently; shapes: B images, L slots (L' kept), H heads.

    positional_bias: whether :meth:`position_bias` can give a bias (False: always None, so a caller may skip it).
    """

    positional_bias: bool

    def qkv(self, block: nn.Module, h: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, H, L, D) queries, keys and values of the normalised input ``h`` (B, L, C), positions applied by the
        original patch index ``ids`` (B, L) (-1: prefix token or empty slot)."""

    def position_bias(self, block: nn.Module, q_ids: torch.Tensor, k_ids: torch.Tensor) -> torch.Tensor | None:
        """(B, H, Lq, Lk) additive attention bias of the (query, key) position pairs, or None when the host has none."""

    def attn_out(self, block: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The attention branch from the heads' output ``o`` (B, L', A) and the same tokens' ``h`` (B, L', C):
        (B, L', C) after the output projection."""

    def scale1(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Layer scale of the attention branch."""

    def scale2(self, block: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """Layer scale of the MLP branch."""


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, A) -> (B, H, L, A / H)."""
    B, L, _ = t.shape
    return t.reshape(B, L, num_heads, -1).transpose(1, 2)


def _fused_qkv(attn: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, L, D) of BEiT-style attention: one ``qkv`` weight, biases on q and v only (a zero k bias)."""
    if attn.q_bias is None:
        qkv = attn.qkv(h)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(h) + bias if attn.qkv_bias_separate else F.linear(h, attn.qkv.weight, bias)  # (B, L, 3A)
    B, L, _ = h.shape
    return qkv.reshape(B, L, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _scaled_out(attn: nn.Module, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Output of attention with an optional scale norm and sigmoid gate (timm ``Attention``, ``EvaAttention``)."""
    o = attn.norm(o)
    if attn.gate is not None:
        o = o * attn.gate(h).sigmoid()
    return attn.proj_drop(attn.proj(o))


def _gamma(gamma: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    return y if gamma is None else gamma * y


class _ViTOps:
    """timm ``Block`` with ``Attention``: no positions inside the block; ``ls1``/``ls2`` layer scale."""

    positional_bias = False

    def qkv(self, block, h, ids):
        attn = block.attn
        B, L, _ = h.shape
        q, k, v = attn.qkv(h).view(B, L, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def position_bias(self, block, q_ids, k_ids):
        return None

    def attn_out(self, block, o, h):
        return _scaled_out(block.attn, o, h)

    def scale1(self, block, y):
        return block.ls1(y)

    def scale2(self, block, y):
        return block.ls2(y)


VIT_OPS = _ViTOps()


def _rope_rows(rope: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (B, L) of a rotary table whose last two dims are (patches, E) and whose leading dims (none, heads,
    or batch and heads) broadcast to (B, H): (B, H or 1, L, E)."""
    table = rope[(None,) * (4 - rope.ndim)].expand(ids.shape[0], -1, -1, -1)  # (B, H|1, N, E)
    index = ids[:, None, :, None].expand(-1, table.shape[1], -1, table.shape[3])  # (B, H|1, L, E)
    return table.gather(2, index)


@dataclass(frozen=True, eq=False)
class _EvaOps:
    """``EvaBlock`` with ``EvaAttention``: rotary embedding by original patch index, ``gamma_1``/``gamma_2``.

    rope: this block's rotary table (sin and cos concatenated, timm's ``cat`` form) over the patch indices of the
    sequence entering the blocks: (N, E), (H, N, E) or (B, H|1, N, E); None for a model without rotary embedding.
    """

    rope: torch.Tensor | None
    positional_bias = False

    def qkv(self, block, h, ids):
        attn = block.attn
        if attn.qkv is not None:
            q, k, v = _fused_qkv(attn, h)  # (B, H, L, D) each
        else:
            q, k, v = (_heads(proj(h), attn.num_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = attn.q_norm(q), attn.k_norm(k)
        if self.rope is not None:
            rows = _rope_rows(self.rope, ids.clamp(min=0))  # (B, H|1, L, E)
            patch = (ids >= 0)[:, None, :, None]  # (B, 1, L, 1): prefix tokens and empty slots are not rotated
            half = attn.rotate_half
            q = torch.where(patch, apply_rot_embed_cat(q, rows, half=half), q).type_as(v)
            k = torch.where(patch, apply_rot_embed_cat(k, rows, half=half), k).type_as(v)
        return q, k, v

    def position_bias(self, block, q_ids, k_ids):
        return None

    def attn_out(self, block, o, h):
        return _scaled_out(block.attn, o, h)

    def scale1(self, block, y):
        return _gamma(block.gamma_1, y)

    def scale2(self, block, y):
        return _gamma(block.gamma_2, y)


def _relative_bias(module: nn.Module, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq, Lk) bias of a BEiT relative-position table for BEiT positions (0: class token, 1 + patch index)."""
    index = module.relative_position_index[q_pos[:, :, None], k_pos[:, None, :]]  # (B, Lq, Lk)
    return module.relative_position_bias_table[index].permute(0, 3, 1, 2)


@dataclass(frozen=True, eq=False)
class _BeitOps:
    """BEiT ``Block`` with its ``Attention``: relative position bias (the block's own, plus the model's shared one),
    ``gamma_1``/``gamma_2``.

    shared: the model's ``rel_pos_bias`` module (one table for every block), or None.
    """

    shared: nn.Module | None
    positional_bias = True

    def qkv(self, block, h, ids):
        return _fused_qkv(block.attn, h)

    def position_bias(self, block, q_ids, k_ids):
        tables = [m for m in (block.attn, self.shared) if m is not None and m.relative_position_bias_table is not None]
        if not tables:
            return None
        q_pos, k_pos = (q_ids + 1).clamp(min=0), (k_ids + 1).clamp(min=0)  # (B, Lq), (B, Lk); prefix (-1) -> 0
        bias = _relative_bias(tables[0], q_pos, k_pos)
        for module in tables[1:]:
            bias = bias + _relative_bias(module, q_pos, k_pos)
        return bias

    def attn_out(self, block, o, h):
        return block.attn.proj_drop(block.attn.proj(o))

    def scale1(self, block, y):
        return _gamma(block.gamma_1, y)

    def scale2(self, block, y):
        return _gamma(block.gamma_2, y)


class Host:
    """One model family: checks, the start of ``forward_features``, dense blocks and :class:`BlockOps`.

    ``ragged`` is True when the exact ragged path of :mod:`ravit.ats.block` can run its blocks (timm ViT only);
    other hosts always run on the padded executor.
    """

    name: str = ""
    description: str = ""
    ragged: bool = False

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def check(self, model: nn.Module) -> str | None:
        """Why the model cannot take ATS (its pooling, a missing class token), or None."""
        raise NotImplementedError

    def check_blocks(self, model: nn.Module, first: int) -> str | None:
        """Why a block from ``first`` on cannot run on the executor, or None."""
        raise NotImplementedError

    def embed(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The (B, N, C) tokens entering block 0, and the per-call position data of the blocks."""
        raise NotImplementedError

    def dense_block(self, model: nn.Module, i: int, x: torch.Tensor, positions: Any) -> torch.Tensor:
        """Block ``i`` by the host's own forward, on (B, N, C) tokens."""
        raise NotImplementedError

    def block_ops(self, model: nn.Module, i: int, positions: Any) -> BlockOps:
        """The :class:`BlockOps` of block ``i`` for this call."""
        raise NotImplementedError


def _block_types(model: nn.Module, first: int, block_type: type, attn_type: type) -> str | None:
    for i, block in enumerate(model.blocks):
        if i >= first and (type(block) is not block_type or type(getattr(block, "attn", None)) is not attn_type):
            return f"block {i} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}"
    return None


def _class_token_pool(model: nn.Module) -> str | None:
    if getattr(model, "cls_token", None) is None:
        return (f"this {type(model).__name__} has no class token (global pooling), and ATS scores tokens by the class "
                f"token's attention")
    if model.global_pool != "token" or getattr(model, "attn_pool", None) is not None:
        return f"this model pools with {model.global_pool!r}"
    return None


class _ViT(Host):
    name = "VisionTransformer"
    description = (
        "timm VisionTransformer models with a class token read by the head (global_pool='token'): ViT, DeiT, DeiT "
        "distilled, ViTs with register tokens, built from timm's pre-norm Block and Attention")
    ragged = True

    def matches(self, model):
        return isinstance(model, VisionTransformer)

    def check(self, model):
        if model.cls_token is None:
            return "this model has no class token (a global-pool ViT), and ATS scores tokens by the class token's " \
                   "attention"
        return _class_token_pool(model)

    def check_blocks(self, model, first):
        return _block_types(model, first, Block, Attention)

    def embed(self, model, images):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images)))), None

    def dense_block(self, model, i, x, positions):
        return model.blocks[i](x)

    def block_ops(self, model, i, positions):
        return VIT_OPS


class _Eva(Host):
    name = "Eva"
    description = (
        "timm Eva models (EVA-02 and other ViTs with rotary position embedding of any rope_type, register tokens "
        "allowed) with a class token and global_pool='token', built from the pre-norm EvaBlock and EvaAttention")

    def matches(self, model):
        return isinstance(model, Eva)

    def check(self, model):
        return _class_token_pool(model)

    def check_blocks(self, model, first):
        reason = _block_types(model, first, EvaBlock, EvaAttention)
        if reason is None:
            for i, block in enumerate(model.blocks[first:], start=first):
                if block.attn.num_prefix_tokens != model.num_prefix_tokens:
                    return (f"block {i} rotates all but {block.attn.num_prefix_tokens} leading tokens, and the model "
                            f"has {model.num_prefix_tokens} prefix tokens")
        return reason

    def embed(self, model, images):
        x, rope = model._pos_embed(model.patch_embed(images))  # (B, N, C), rotary table or None
        return model.norm_pre(x), rope

    def dense_block(self, model, i, x, positions):
        return model.blocks[i](x, rope=_block_rope(model, i, positions))

    def block_ops(self, model, i, positions):
        return _EvaOps(_block_rope(model, i, positions))


def _block_rope(model: nn.Module, i: int, rope: torch.Tensor | None) -> torch.Tensor | None:
    """Block ``i``'s rotary table: ``rope_type='mixed'`` has one per block (leading dim), the others one for all."""
    return rope[i] if rope is not None and getattr(model, "rope_mixed", False) else rope


class _Beit(Host):
    name = "Beit"
    description = (
        "timm Beit models (BEiT, BEiT v2: relative position bias per block and/or shared, or absolute embedding "
        "only) with global_pool='token', built from BEiT's Block and Attention")

    def matches(self, model):
        return isinstance(model, Beit)

    def check(self, model):
        return _class_token_pool(model)

    def check_blocks(self, model, first):
        return _block_types(model, first, BeitBlock, BeitAttention)

    def embed(self, model, images):
        x = model.patch_embed(images)  # (B, N - 1, C)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, N, C)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        shared = model.rel_pos_bias() if model.rel_pos_bias is not None else None  # (H, N, N), for dense blocks
        return model.pos_drop(x), shared

    def dense_block(self, model, i, x, positions):
        return model.blocks[i](x, shared_rel_pos_bias=positions)

    def block_ops(self, model, i, positions):
        return _BeitOps(model.rel_pos_bias)


VIT, EVA, BEIT = _ViT(), _Eva(), _Beit()
HOSTS: tuple[Host, ...] = (VIT, EVA, BEIT)


def host_of(model: nn.Module) -> Host | None:
    """The host family of ``model``, or None when ATS has no adapter for it."""
    return next((host for host in HOSTS if host.matches(model)), None)
