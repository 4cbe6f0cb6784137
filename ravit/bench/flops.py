"""GMACs counted with ``torch.utils.flop_counter.FlopCounterMode`` (GMACs = FLOPs / 2, the papers' unit).

Papers in this field (DeiT, FAN, ATS) report "GFLOPs" that are really GMACs (one multiply-add = 1), so we report
GMACs = FLOPs / 2. In torch 2.14 the CPU fused-attention op ``_scaled_dot_product_flash_attention_for_cpu`` has no
formula and counts 0; we register the same formula torch uses for its other SDPA kernels.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ravit.errors import InvalidArgumentError

__all__ = ["count_gmacs", "count_flops"]


def _register_cpu_sdpa() -> None:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return
    from torch.utils.flop_counter import flop_registry

    if op.default in flop_registry:
        return

    # Written here because torch 2.14 lacks it (pytorch#195460): query, key, value are the op's first arguments.
    @register_flop_formula(op)
    def _cpu_sdpa_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)


_register_cpu_sdpa()


@torch.no_grad()
def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs (2 per multiply-add) executed by ``fn(*args, **kwargs)``; only matmul/conv/attention ops count."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def count_gmacs(model: torch.nn.Module, images: torch.Tensor) -> float:
    """GMACs per image of ``model(images)``, averaged over the batch (the papers' unit, e.g. DeiT-S = 4.6)."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise InvalidArgumentError(
            f"expected a non-empty batch of images (B, C, H, W), got shape {tuple(images.shape)}")
    return count_flops(model, images) / 2 / images.shape[0] / 1e9
