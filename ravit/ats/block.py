"""A timm ViT block run on a ragged batch of tokens, optionally with Adaptive Token Sampling (Fayyaz et al., ECCV 2022,
Sec. 3, "soft downsampling").

The block's own children do the work (``norm1``, ``attn.qkv``, ``attn.q_norm``/``k_norm``, ``attn.norm``,
``attn.gate``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``); nothing is
copied or re-registered. Tokens really leave the computation (not only masked, as in the released code):

- token-wise layers (norms, qkv, proj, MLP) run on the *packed* tokens of the batch, (T, C) with T = the sum of the
  images' token counts, so an image costs what it keeps, not the batch maximum;
- the scores use the class token's attention row only, (B, H, 1, N);
- attention runs on SDPA with the kept queries only against all keys of the block input (no N x N matrix is
  materialised by us); a ragged batch runs image by image on CPU, padded with a key mask on other devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ravit.ats.sampling import class_attention_scores

__all__ = ["Tokens", "block_forward", "pack", "unpack"]


class Tokens(NamedTuple):
    """Per-call token state between blocks (never stored on a module).

    x: (T, C) the packed tokens, image after image, each image's prefix tokens first.
    lengths: (B,) int64 token count of each image, prefix included.
    ids: (T,) int64 original patch index of each packed token (-1 for prefix tokens).
    width: max(lengths), the padded width (a Python int, so shapes need no device sync).
    """

    x: torch.Tensor
    lengths: torch.Tensor
    ids: torch.Tensor
    width: int

    @property
    def uniform(self) -> bool:
        """True when every image has ``width`` tokens: then (T, C) is a free view of (B, width, C)."""
        return self.x.shape[0] == self.lengths.shape[0] * self.width

    @property
    def valid(self) -> torch.Tensor:
        """(B, width) bool: which padded slots hold a token."""
        return _valid(self.lengths, self.width)

    @property
    def slot_mask(self) -> torch.Tensor | None:
        """``valid``, or None when every slot holds a token (then no masks or copies are needed)."""
        return None if self.uniform else self.valid


def _valid(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]  # (B, width)


def pack(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, L, C) -> (T, C), keeping the ``valid`` slots; ``None`` means all slots (a free view)."""
    return x.reshape(-1, x.shape[-1]) if valid is None else x[valid]


def unpack(x: torch.Tensor, valid: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """(T, C) -> (B, L, C) with zeros in the empty slots; ``None`` means every slot is filled (a free view)."""
    if valid is None:
        return x.reshape(*shape, x.shape[-1])
    out = x.new_zeros(*shape, x.shape[-1])
    out[valid] = x
    return out


def _per_sample(module: nn.Module, y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Apply a per-sample module (DropPath) to packed rows: it draws one multiplier per image, not per token."""
    if isinstance(module, nn.Identity) or not module.training:
        return module(y)
    scale = module(y.new_ones(lengths.shape[0], 1))  # (B, 1): 0 or 1/keep_prob per image
    return y * torch.repeat_interleave(scale, lengths, dim=0)  # (T', 1)


Selector = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tokens: Tokens,
            value_norm: bool, padded: bool | None = None) -> torch.Tensor:
    """(B, width) class-attention scores (times the value norm with ``value_norm``) of the packed (T, H, D) q, k, v
    of ``tokens``; 0 past each image's length.

    A ragged batch is scored image by image on CPU, each exactly as if it were alone, and padded with a key mask
    elsewhere (``padded`` forces one or the other), as :func:`_attention` does. On a GPU every op is a launch: the
    paper's mode at batch 64 on DeiT-S ran 14,067 aten ops per forward image by image (0.22x dense on an H200, where
    the host's dispatch is the bound) against 1,758 padded; and GPU matmuls round by batch shape anyway, so
    image-by-image scoring would not make a GPU batch bitwise independent.
    """
    B, L = tokens.lengths.shape[0], tokens.width
    H, D = k.shape[1:]
    if tokens.uniform:  # one batched call
        q, k, v = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        return class_attention_scores(q[:, :, 0], k, v, scale, value_norm=value_norm)
    if padded is None:
        padded = q.device.type != "cpu"
    if padded:
        valid = tokens.valid  # (B, L)
        kb, vb = (unpack(t.flatten(1), valid, (B, L)).view(B, L, H, D).transpose(1, 2) for t in (k, v))  # (B, H, L, D)
        q_cls = q.index_select(0, torch.cumsum(tokens.lengths, 0) - tokens.lengths)  # (B, H, D) each image's first row
        return class_attention_scores(q_cls, kb, vb, scale, key_valid=valid, value_norm=value_norm)
    scores = q.new_zeros(B, L, dtype=torch.float32)
    start = 0
    for b, n in enumerate(tokens.lengths.tolist()):  # ragged: each image on its own, exactly as if it were alone
        kb, vb = (t[start : start + n].transpose(0, 1)[None] for t in (k, v))  # (1, H, n, D)
        scores[b, :n] = class_attention_scores(q[start][None], kb, vb, scale, value_norm=value_norm)[0]
        start += n
    return scores


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_lengths: torch.Tensor, kv_lengths: torch.Tensor,
    dropout_p: float, padded: bool | None = None, q_width: int | None = None, kv_width: int | None = None,
) -> torch.Tensor:
    """SDPA of each image's queries against its own keys, on packed tensors: (T_q, H, D) -> (T_q, H * D).

    Images of equal lengths run as one batch. Ragged batches run image by image on CPU (no padding, no mask: an
    image costs exactly what it keeps), and padded to the batch maximum with a key mask elsewhere (``padded``
    forces one or the other), where one kernel launch per image would cost more than the padding. ``q_width`` and
    ``kv_width`` are the maximum lengths when the caller knows them (saves a device sync each).
    """
    B = q_lengths.shape[0]
    H, D = q.shape[1:]
    lq = int(q_lengths.max()) if q_width is None else q_width
    lk = int(kv_lengths.max()) if kv_width is None else kv_width
    if q.shape[0] == B * lq and k.shape[0] == B * lk:  # every image has the maximum length: one batched call
        qb, kb, vb = q.view(B, lq, H, D), k.view(B, lk, H, D), v.view(B, lk, H, D)
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qb, kb, vb)), dropout_p=dropout_p)
        return out.transpose(1, 2).reshape(B * lq, H * D)  # (T_q, A)
    if padded is None:
        padded = q.device.type != "cpu"
    if padded:
        q_valid, kv_valid = _valid(q_lengths, lq), _valid(kv_lengths, lk)
        qb = unpack(q.flatten(1), q_valid, (B, lq)).view(B, lq, H, D)
        kb, vb = (unpack(t.flatten(1), kv_valid, (B, lk)).view(B, lk, H, D) for t in (k, v))
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (qb, kb, vb)), attn_mask=kv_valid[:, None, None, :], dropout_p=dropout_p
        )  # (B, H, Lq, D)
        return pack(out.transpose(1, 2).reshape(B, lq, H * D), q_valid)
    outs, q_start, kv_start = [], 0, 0
    for nq, nk in zip(q_lengths.tolist(), kv_lengths.tolist(), strict=True):
        qb = q[q_start : q_start + nq].transpose(0, 1)[None]  # (1, H, nq, D)
        kb, vb = (t[kv_start : kv_start + nk].transpose(0, 1)[None] for t in (k, v))  # (1, H, nk, D)
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout_p)[0].transpose(0, 1))
        q_start, kv_start = q_start + nq, kv_start + nk
    return torch.cat(outs).flatten(1)  # (T_q, A)


def _kept_rows(keep: torch.Tensor, tokens: Tokens, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows of the kept tokens and the new lengths; keep (B, width - P) over the patch slots (a subset of the
    valid ones). Rows come image by image, each image's tokens in their input order, prefix tokens first."""
    keep = F.pad(keep, (num_prefix, 0), value=True)  # (B, width): prefix tokens are always kept
    image, slot = keep.nonzero(as_tuple=True)  # (T',) each, image-major, slots ascending
    starts = torch.cumsum(tokens.lengths, 0) - tokens.lengths  # (B,) first packed row of each image
    return starts.index_select(0, image) + slot, keep.sum(dim=1)


def block_forward(block: nn.Module, tokens: Tokens, num_prefix: int, select: Selector | None = None,
                  value_norm: bool = True) -> Tokens:
    """One pre-norm timm ``Block`` on ragged tokens; with ``select``, an ATS block.

    Args:
        block: a ``timm.models.vision_transformer.Block`` with ``timm.layers.Attention``.
        tokens: the input tokens.
        num_prefix: number of prefix tokens (class, distillation, register) at the front of each image; the class
            token is the first.
        select: ``select(scores, valid) -> keep``, all (B, width - num_prefix) over the patch tokens; None keeps all.
        value_norm: score by class attention x value norm (Eq. 3); False: the class attention alone (Sec. 4.3).

    Returns:
        The output tokens: prefix tokens and the kept tokens, in their input order.
    """
    attn = block.attn
    H, D = attn.num_heads, attn.head_dim

    h = block.norm1(tokens.x)  # (T, C)
    q, k, v = attn.qkv(h).unflatten(-1, (3, H, D)).unbind(1)  # (T, H, D) each
    q, k = attn.q_norm(q), attn.k_norm(k)

    if select is None:
        lengths, ids, width, rows = tokens.lengths, tokens.ids, tokens.width, None
    else:
        with torch.no_grad():  # scores only steer discrete choices: no gradient flows through them
            scores = _scores(q, k, v, attn.scale, tokens, value_norm)[:, num_prefix:]  # (B, width - P)
            valid = tokens.valid[:, num_prefix:]
            keep = select(scores, valid) & valid
            rows, lengths = _kept_rows(keep, tokens, num_prefix)  # (T',), (B,)
        ids, width = tokens.ids.index_select(0, rows), int(lengths.max())

    dropout_p = attn.attn_drop.p if attn.training else 0.0
    o = _attention(q if rows is None else q.index_select(0, rows), k, v, lengths, tokens.lengths, dropout_p,
                   q_width=width, kv_width=tokens.width)  # (T', A)
    o = attn.norm(o)
    # index_select, not x[rows]: the same rows, about 5x faster on CPU for these sizes
    x = tokens.x if rows is None else tokens.x.index_select(0, rows)  # (T', C) residual: the kept tokens' input
    if attn.gate is not None:
        o = o * attn.gate(h if rows is None else h.index_select(0, rows)).sigmoid()
    o = attn.proj_drop(attn.proj(o))

    x = x + _per_sample(block.drop_path1, block.ls1(o), lengths)
    x = x + _per_sample(block.drop_path2, block.ls2(block.mlp(block.norm2(x))), lengths)
    return Tokens(x, lengths, ids, width)
