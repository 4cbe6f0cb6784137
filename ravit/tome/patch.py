"""``apply_tome`` / ``remove_tome``: Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023)
plugged into a timm ViT.

As with ATS (:mod:`ravit.ats.patch`), the model's class is swapped for a subclass whose ``forward_features`` runs the
blocks through :func:`ravit.tome.block.block_forward`; blocks, parameters and buffers are untouched, so ``state_dict``
keys stay the same and weights load before or after patching. The settings live in ``model.tome_config`` (a frozen
dataclass, not a parameter); token sizes live in local variables of one call only.

ToMe is static: every token count depends on r and the input size only, never on the image, so a patched model
exports (``torch.export``, ONNX) and compiles (``torch.compile(fullgraph=True)``) as one graph.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.layers import Attention
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ravit._plugin import TokenReducer, attach, detach
from ravit.ats.fan import fan_check
from ravit.ats.patch import UnsupportedModelError, _check_images, has_ats
from ravit.errors import InvalidArgumentError
from ravit.models.fan import FAN
from ravit.tome.block import block_forward
from ravit.tome.fan import fan_tome_features

__all__ = ["SUPPORTED", "ToMeConfig", "apply_tome", "has_tome", "remove_tome", "tome_forward_features"]

SUPPORTED = (
    "ToMe supports timm VisionTransformer models built from timm's pre-norm Block and Attention: ViT and DeiT with a "
    "class token, DeiT distilled, ViTs with register tokens or global average pooling (prefix tokens never merge); "
    "ravit's FAN-ViT and FAN-Hybrid (ravit.tome.fan)"
)


@dataclass(frozen=True)
class ToMeConfig:
    """Validated ToMe settings for one model: tokens merged in each block (before clamping) and proportional
    attention."""

    r: tuple[int, ...]
    prop_attn: bool = True


def has_tome(model: nn.Module) -> bool:
    """True when ``apply_tome`` has patched ``model``."""
    return isinstance(getattr(model, "tome_config", None), ToMeConfig)


def _check_r_value(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"r{where} must be an int (tokens merged per block), got {value!r}")
    if value < 0:
        raise InvalidArgumentError(f"r{where} must be >= 0 (tokens merged per block), got {value}")
    return int(value)


def _parse_r(r: object, depth: int) -> tuple[int, ...]:
    """One int for every block, or a sequence of one int per block."""
    if isinstance(r, Sequence) and not isinstance(r, (str, bytes)):
        if len(r) != depth:
            raise InvalidArgumentError(f"got {len(r)} values of r for a model of {depth} blocks; give one per block")
        return tuple(_check_r_value(v, f"[{i}]") for i, v in enumerate(r))
    if isinstance(r, bool) or not isinstance(r, numbers.Integral):
        raise InvalidArgumentError(f"r must be an int or a sequence of one int per block, got {r!r}")
    return (_check_r_value(r, ""),) * depth


def _check_host(model: nn.Module) -> None:
    if has_tome(model):
        raise InvalidArgumentError(
            "ToMe is already applied to this model; call ravit.tome.remove_tome(model) first to change it")
    if has_ats(model):
        raise InvalidArgumentError("ATS is applied to this model; call ravit.remove_ats(model) before applying ToMe")
    if isinstance(model, FAN):
        reason = fan_check(model, 0)
        if reason is not None:
            raise UnsupportedModelError(f"{SUPPORTED}; {reason}")
        return
    if not isinstance(model, VisionTransformer):
        reason = _positions_in_attention(model)
        raise UnsupportedModelError(f"{SUPPORTED}; got {type(model).__name__}" + (f": {reason}" if reason else ""))
    for i, block in enumerate(model.blocks):
        if type(block) is not Block or type(getattr(block, "attn", None)) is not Attention:
            raise UnsupportedModelError(
                f"{SUPPORTED}; block {i} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}"
            )


def _positions_in_attention(model: nn.Module) -> str | None:
    """Why merging is undefined on a host whose attention reads each token's patch position (Eva's rotary embedding,
    BEiT's relative position bias), or None for other hosts."""
    if isinstance(model, Eva) and model.rope is not None:
        kind = "rotates each token's query and key by its patch position (rotary position embedding)"
    elif isinstance(model, Beit) and (model.rel_pos_bias is not None or any(
            getattr(block.attn, "relative_position_bias_table", None) is not None for block in model.blocks)):
        kind = "adds a bias per (query position, key position) pair (relative position bias)"
    else:
        return None
    return (
        f"its attention {kind} in every block, and a merged token is a size-weighted average of several patches at "
        f"different positions (Bolya et al., ICLR 2023, Sec. 3), to which neither rotation nor bias applies: ToMe "
        f"defines no position for it, and any choice (the destination token's, an average) would change what the "
        f"attention computes; ravit.apply_ats keeps or drops whole tokens, each at its own position, on these models")


class _ToMeModel(TokenReducer):
    """What replaces the host's forward while ToMe is applied."""

    _name = "ToMe"
    _why = "tokens merge block by block"

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return tome_forward_features(self, images)


def tome_forward_features(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """``forward_features`` of a ToMe model: (B, N', C) normalised tokens, N' = N minus the tokens merged.

    Args:
        model: a model patched by :func:`apply_tome`.
        images: (B, C, H, W).
    """
    cfg: ToMeConfig = model.tome_config
    if isinstance(model, FAN):
        return fan_tome_features(model, images)
    _check_images(model, images)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))  # (B, N, C)
    protected = model.num_prefix_tokens
    size = None  # (B, N, 1) token sizes once a block has merged
    use_checkpoint = model.grad_checkpointing and torch.is_grad_enabled()
    for block, r in zip(model.blocks, cfg.r, strict=True):
        if use_checkpoint:
            x, size = checkpoint(block_forward, block, x, size, r, protected, cfg.prop_attn, use_reentrant=False)
        else:
            x, size = block_forward(block, x, size, r, protected, cfg.prop_attn)
    return model.norm(x)


def apply_tome(model: nn.Module, r: int | Sequence[int], prop_attn: bool = True, static: bool = True) -> nn.Module:
    """Patch a timm ViT in place with Token Merging and return it.

    Args:
        model: a timm ``VisionTransformer`` or ravit FAN-ViT / FAN-Hybrid (see ``SUPPORTED``).
        r: tokens merged in each block: an int (the same r in every block, the paper's constant schedule, Sec. 3
            "Strategy") or one int per block. Each block merges at most half of its mergeable tokens (larger values
            are clamped).
        prop_attn: proportional attention (Sec. 3, "Tracking Token Size"): on for off-the-shelf models, as in the
            released code.
        static: must be True. It matches ``apply_ats``: ToMe's token counts depend only on r, never on the image.

    Returns:
        ``model``, whose forward returns what it returned before (logits), computed on the merged tokens.
    """
    if static is not True:
        raise InvalidArgumentError(
            f"static must be True, got {static!r}: ToMe is static by nature (every block removes r tokens whatever "
            f"the image), so there is no dynamic variant")
    if not isinstance(prop_attn, bool):
        raise InvalidArgumentError(f"prop_attn must be True or False, got {prop_attn!r}")
    _check_host(model)
    config = ToMeConfig(r=_parse_r(r, len(model.blocks)), prop_attn=prop_attn)
    return attach(model, _ToMeModel, "tome_config", config)


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_tome`: the original class back, the settings dropped; returns ``model``."""
    if not has_tome(model):
        raise InvalidArgumentError("this model has no ToMe applied (nothing to remove)")
    return detach(model, "tome_config")
