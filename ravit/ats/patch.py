"""``apply_ats`` / ``remove_ats``: Adaptive Token Sampling (Fayyaz et al., ECCV 2022) plugged into a timm ViT, Eva
or Beit (the hosts of :mod:`ravit.ats.hosts`).

The model's class is swapped for a subclass whose ``forward_features`` runs the blocks on ragged tokens
(:mod:`ravit.ats.block`, timm ViT) or padded slots (:mod:`ravit.ats.padded`); blocks, parameters and buffers are
untouched, so ``state_dict`` keys stay the same and weights load before or after patching. The settings live in
``model.ats_config`` (a frozen dataclass, not a parameter); per-call token state lives in local variables only.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ravit._plugin import TokenReducer, attach, detach
from ravit.ats import cpu_select
from ravit.ats.block import Tokens, block_forward, unpack
from ravit.ats.config import ATSConfig, Budget, Sampler
from ravit.ats.fan import channel_forward, class_attention, dense_slots, fan_check, mixing_forward
from ravit.ats.hosts import HOSTS, Host, host_of
from ravit.ats.padded import Slots, filled_topk_forward, one_image_route, padded_block_forward, to_tokens
from ravit.ats.sampling import samples_per_image, static_sampler
from ravit.errors import InvalidArgumentError
from ravit.models.fan import FAN

__all__ = ["apply_ats", "remove_ats", "has_ats", "ats_forward_features", "UnsupportedModelError"]

SUPPORTED = "ATS supports " + "; ".join(host.description for host in HOSTS) + (
    "; ravit's FAN-ViT and FAN-Hybrid (FAN blocks with channel processing, class-attention head; ravit.ats.fan)")


class UnsupportedModelError(InvalidArgumentError):
    """The model cannot take ATS; the message says what is supported."""


def has_ats(model: nn.Module) -> bool:
    """True when ``apply_ats`` has patched ``model``."""
    return isinstance(getattr(model, "ats_config", None), ATSConfig)


def _check_host(model: nn.Module) -> None:
    if has_ats(model):
        raise InvalidArgumentError(
            "ATS is already applied to this model; call ravit.remove_ats(model) first to change it")
    if getattr(model, "tome_config", None) is not None:  # ravit.tome's marker (tome imports this module, not back)
        raise InvalidArgumentError(
            "ToMe is applied to this model; call ravit.remove_tome(model) first (ATS and ToMe do not combine)")
    if isinstance(model, FAN):
        return  # checked with the first ATS block known (_check_blocks)
    host = host_of(model)
    if host is None:
        raise UnsupportedModelError(f"{SUPPORTED}; got {type(model).__name__}")
    reason = host.check(model)
    if reason is not None:
        raise UnsupportedModelError(f"{SUPPORTED}; {reason}")


def _check_blocks(model: nn.Module, first: int) -> None:
    """Blocks from the first ATS block on run through the host's adapter, which knows the host's own block only."""
    reason = fan_check(model, first) if isinstance(model, FAN) else host_of(model).check_blocks(model, first)
    if reason is not None:
        raise UnsupportedModelError(f"{SUPPORTED}; {reason}")


class _ATSModel(TokenReducer):
    """What replaces the host's forward while ATS is applied (``ravit.ats.trace`` reports per-image tokens)."""

    _name = "ATS"
    _why = "tokens are dropped per image; ravit.ats.trace(model, images) reports them"

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return ats_forward_features(self, images)


def _select(scores: torch.Tensor, valid: torch.Tensor, sampler: Sampler, budget: Budget, n_ref: int) -> torch.Tensor:
    return sampler(scores, valid, samples_per_image(budget, valid.sum(dim=1), n_ref))


def _check_images(model: nn.Module, images: torch.Tensor) -> None:
    """A float (B, C, H, W) batch with the model's channels: integer pixels (uint8 0..255) would not be normalised."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidArgumentError(f"expected a batch of images (B, C, H, W), got {shape}")
    if not images.is_floating_point():
        raise InvalidArgumentError(
            f"expected float images, got {images.dtype}: convert and normalise them first, e.g. "
            f"images.float() / 255 then the model's mean and std")
    proj = getattr(model.patch_embed, "proj", None)
    chans = getattr(proj, "in_channels", None)
    if chans is not None and images.shape[1] != chans:
        raise InvalidArgumentError(
            f"expected {chans} input channels, got {images.shape[1]} (shape {tuple(images.shape)})")


def ats_forward_features(
    model: nn.Module, images: torch.Tensor, record: list[Tokens] | None = None
) -> torch.Tensor:
    """``forward_features`` of an ATS model: (B, L, C) tokens, zero past each image's count.

    Args:
        model: a model patched by :func:`apply_ats`.
        images: (B, C, H, W).
        record: if given, the tokens leaving each ATS block are appended to it (used by ``trace``).
    """
    cfg: ATSConfig = model.ats_config
    if not cfg.static and torch.compiler.is_exporting():
        raise InvalidArgumentError(
            "this ATS model keeps a data-dependent number of tokens per image, so it cannot be exported; apply ATS "
            "with static=True (int budgets, or schedule='linear') for torch.export and ONNX")
    if isinstance(model, FAN):
        return _fan_features(model, images, record)
    host = host_of(model)
    _check_images(model, images)
    x, positions = host.embed(model, images)  # (B, N, C), the host's per-call position data
    B, N, C = x.shape
    P = model.num_prefix_tokens
    if B == 0:  # an empty batch gives an empty result, as the host model's dense forward does
        empty = Tokens(x.reshape(0, C), torch.zeros(0, dtype=torch.long, device=x.device),
                       torch.zeros(0, dtype=torch.long, device=x.device), 0)
        if record is not None:
            record.extend([empty] * len(cfg.blocks))
        return model.norm(x)
    use_checkpoint = model.grad_checkpointing and torch.is_grad_enabled()
    for i in range(cfg.blocks[0]):  # dense blocks before the first ATS block: the host's own forward
        if use_checkpoint:
            x = checkpoint(host.dense_block, model, i, x, positions, use_reentrant=False)
        else:
            x = host.dense_block(model, i, x, positions)
    if cfg.padded or not host.ragged:
        return _padded_features(model, host, x, positions, record, use_checkpoint)

    ids = torch.cat([torch.full((P,), -1), torch.arange(N - P)]).to(images.device).repeat(B)  # (B·N,)
    tokens = Tokens(x.reshape(B * N, C), torch.full((B,), N, device=images.device), ids, N)
    budgets = dict(zip(cfg.blocks, cfg.budgets, strict=True))
    sampler = cfg.sampler_fn()
    value_norm = cfg.score == "attention_value"
    for i in range(cfg.blocks[0], len(model.blocks)):
        select = None
        if i in budgets:
            select = cfg.with_power(functools.partial(_select, sampler=sampler, budget=budgets[i], n_ref=N - P))
        if use_checkpoint:
            tokens = checkpoint(block_forward, model.blocks[i], tokens, P, select, value_norm, use_reentrant=False)
        else:
            tokens = block_forward(model.blocks[i], tokens, P, select, value_norm)
        if record is not None and select is not None:
            record.append(tokens)
    x = unpack(model.norm(tokens.x), tokens.slot_mask, (B, tokens.width))  # (B, L, C)
    return x


def _block_keep(cfg: ATSConfig, sampler, budget, n_ref: int, free_slots: int):
    """One padded ATS block's ``keep_fn(scores, valid)`` (fed score^``score_power``) and slot width: with
    ``static``, K as given and a width of K capped by the ``free_slots`` left; otherwise the adaptive selection
    against ``n_ref`` original patch tokens and the batch's largest kept count (width None)."""
    if cfg.static:
        return cfg.with_power(static_sampler(sampler, budget)), min(budget, free_slots)
    return cfg.with_power(functools.partial(_select, sampler=sampler, budget=budget, n_ref=n_ref)), None


def _padded_features(model: nn.Module, host: Host, x: torch.Tensor, positions: object, record: list[Tokens] | None,
                     use_checkpoint: bool) -> torch.Tensor:
    """The blocks from the first ATS block on, on padded slots (:mod:`ravit.ats.padded`): ``static``, ``fuse``, or
    any mode on a host without a ragged path (the width then follows the batch's largest kept count)."""
    cfg: ATSConfig = model.ats_config
    B, N, _ = x.shape
    P = model.num_prefix_tokens
    patch_ids = torch.cat([torch.full((P,), -1), torch.arange(N - P)]).to(x.device)  # (N,)
    slots = Slots(x, x.new_ones(B, N, dtype=torch.float32), patch_ids.expand(B, N))
    budgets = dict(zip(cfg.blocks, cfg.budgets, strict=True))
    sampler = cfg.sampler_fn()
    fused, value_norm = cfg.fuse != "none", cfg.score == "attention_value"
    # static Top-K keeps every slot filled: the lean route (same result, fewer ops per ATS block) for one image,
    # and for a batch with the kernels where the host has no position bias
    static_topk = cfg.static and cfg.sampler == "topk"
    one_image, kernels = static_topk and one_image_route(x), static_topk and cpu_select.applies(x)
    for i in range(cfg.blocks[0], len(model.blocks)):
        ops = host.block_ops(model, i, positions)
        if i in budgets and (one_image or (kernels and not ops.positional_bias)):
            width = min(budgets[i], slots.x.shape[1] - P)
            forward, args = filled_topk_forward, (model.blocks[i], slots, P, width, fused, ops, value_norm,
                                                  cfg.redundancy, kernels)
        else:
            keep_fn, width = None, None
            if i in budgets:
                keep_fn, width = _block_keep(cfg, sampler, budgets[i], N - P, slots.x.shape[1] - P)
            forward, args = padded_block_forward, (model.blocks[i], slots, P, fused, keep_fn, width, fused, ops,
                                                   value_norm, cfg.redundancy)
        slots = checkpoint(forward, *args, use_reentrant=False) if use_checkpoint else forward(*args)
        if record is not None and i in budgets:
            record.append(to_tokens(slots))
    return model.norm(slots.x) * (slots.size > 0)[..., None].to(slots.x.dtype)  # (B, L, C), zero in empty slots


def _fan_features(model: FAN, images: torch.Tensor, record: list[Tokens] | None) -> torch.Tensor:
    """``forward_features`` of a FAN with ATS (:mod:`ravit.ats.fan`): (B, 1 + L, C), zero in empty slots."""
    cfg: ATSConfig = model.ats_config
    x, hw = model._embed(images)  # (B, G, C) on an (H, W) grid; FAN checks the images
    for i in range(cfg.blocks[0]):  # dense blocks before the first ATS block: FAN's own forward
        x, hw = model._run_block(model.blocks[i], x, hw)
    slots = dense_slots(x)
    budgets = dict(zip(cfg.blocks, cfg.budgets, strict=True))
    sampler = cfg.sampler_fn()
    fused = cfg.fuse != "none"
    for i in range(cfg.blocks[0], len(model.blocks)):
        keep_fn, width = None, None
        if i in budgets:
            keep_fn, width = _block_keep(cfg, sampler, budgets[i], x.shape[1], slots.x.shape[1])
        slots, _ = mixing_forward(model.blocks[i], slots, hw, keep_fn, width, proportional=fused,
                                  value_norm=cfg.score == "attention_value", fuse=fused, redundancy=cfg.redundancy)
        slots = channel_forward(model.blocks[i], slots, hw, proportional=fused)
        if record is not None and keep_fn is not None:
            record.append(to_tokens(slots))  # GridSlots has the fields it reads (x, size, ids)
    return class_attention(model, slots, proportional=fused)


def apply_ats(
    model: nn.Module,
    blocks: Iterable[int] = range(3, 12),
    budget: Budget | Sequence[Budget] = None,
    sampler: str | Sampler = "inverse_transform",
    *,
    schedule: str = "each",
    fuse: str = "none",
    static: bool = False,
    score: str = "attention_value",
    score_power: float = 1.0,
    redundancy: float = 0.0,
) -> nn.Module:
    """Patch a timm ViT, Eva or Beit in place with Adaptive Token Sampling and return it.

    Args:
        model: a timm ``VisionTransformer``, ``Eva`` or ``Beit`` with a class token read by the head (see
            ``SUPPORTED``). Eva and Beit run every mode on padded slots (:mod:`ravit.ats.padded`); the paper's
            default mode there keeps each image's sampled tokens, padded to the batch's largest count and masked.
        blocks: indices of the blocks that sample tokens (0-based; the paper's DeiT-S uses 3..11, Sec. 4).
        budget: K per ATS block: None (the released default, "all tokens": K = the original patch count), an int
            count of patch tokens, a ratio in (0, 1] of the patch tokens entering the block, or one per block.
            Prefix tokens (class, distillation, register) are always kept on top of K.
        sampler: "inverse_transform" (the paper's, Sec. 3.2), "topk" (its ablation baseline), or a callable
            ``(scores, valid, n_samples) -> keep`` with the shapes of :func:`ravit.ats.inverse_transform_sampling`.
        schedule: "each" (the paper's: every ATS block gets ``budget``; a ratio is of the tokens entering it) or
            "linear" (one budget = the patch tokens left after the last ATS block, a ratio of the original count;
            the count falls linearly over the ATS blocks). See :mod:`ravit.ats.config`.
        fuse: "none" (the paper's: dropped tokens leave) or "nearest" (each dropped token is averaged into its most
            similar kept token, and attention weighs tokens by how many they hold).
        static: every image keeps exactly K slots per ATS block (int budgets), so shapes depend only on the budget
            and the model exports with ``torch.export`` / ONNX / ``torch.compile(fullgraph=True)``.
        score: "attention_value" (the paper's: class attention x value norm, Eq. 3) or "attention" (the class
            attention alone, the ablation of Sec. 4.3).
        score_power: the sampler sees score^p; 1 (the paper's), or p < 1 to flatten the scores so inverse transform
            sampling keeps more distinct tokens per sample (ravit's option; refused with Top-K, where it changes
            nothing).
        redundancy: gamma >= 0; each score is multiplied by (1 - c)^gamma, c the token's largest key similarity to
            a more important token, so near-duplicates of kept tokens are dropped (and, fused, merged) first
            (ravit's option, ToMe's insight inside ATS's ranking; 0, off, is the paper's). See
            :mod:`ravit.ats.config`.

    Returns:
        ``model``, whose forward returns what it returned before (logits), computed on the kept tokens.
    """
    _check_host(model)
    config = ATSConfig.build(
        blocks, budget, sampler, depth=len(model.blocks), num_patches=_num_patches(model.patch_embed),
        schedule=schedule, fuse=fuse, static=static, score=score, score_power=score_power, redundancy=redundancy,
    )
    _check_blocks(model, config.blocks[0])
    return attach(model, _ATSModel, "ats_config", config)


def _num_patches(patch_embed: nn.Module) -> int:
    """Patch tokens at the model's nominal input size (FAN-Hybrid's embedding gives only its grid)."""
    num = getattr(patch_embed, "num_patches", None)
    return num if num is not None else patch_embed.grid_size[0] * patch_embed.grid_size[1]


def remove_ats(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_ats`: the original class back, the settings dropped; returns ``model``."""
    if not has_ats(model):
        raise InvalidArgumentError("this model has no ATS applied (nothing to remove)")
    return detach(model, "ats_config")
