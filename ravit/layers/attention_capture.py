"""Attention maps of timm-style attention modules, read without changing the modules: explicit path plus hooks.

timm's convention (``timm.layers.Attention``, CaiT/XCiT ``ClassAttn``, ravit's ``TokenMixing``): a ``fused_attn``
flag picks ``F.scaled_dot_product_attention`` or the explicit path, and the explicit path passes the softmax
probabilities through the ``attn_drop`` module. These are the tensors ``timm.utils.AttentionExtract`` records; it is
not used because it leaves its hooks on the model and keeps the fused path (which has no probabilities). Here the
flags and hooks are restored on exit, also when the forward raises, so nothing stays on the model between calls.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["capture_attention", "explicit_attention"]


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Inside the context every module of ``model`` with a ``fused_attn`` flag runs its explicit path."""
    saved = {module: module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")}
    try:
        for module in saved:
            module.fused_attn = False
        yield
    finally:
        for module, flag in saved.items():
            module.fused_attn = flag


@contextlib.contextmanager
def capture_attention(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention probabilities of ``modules`` ({name: attention module with ``attn_drop``}).

    Yields ``{name: (B, heads, N_query, N_key)}``, filled (detached) by each forward pass inside the context; in
    training mode the recorded tensor is ``attn_drop``'s output, i.e. after dropout.
    """
    captured: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            captured[name] = output.detach()

        return hook

    saved = {name: attn.fused_attn for name, attn in modules.items() if hasattr(attn, "fused_attn")}
    handles = []
    try:
        for name, attn in modules.items():
            if name in saved:
                attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_hook(record(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        for name, flag in saved.items():
            modules[name].fused_attn = flag
