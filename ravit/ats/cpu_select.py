"""Static Top-K's lean route (:func:`ravit.ats.padded.filled_topk_forward`) as two ravit CPU kernels
(``cpu_select.cpp``, built with FAN's by :mod:`ravit.layers.cpu_kernels`).

At batch 1 on a CPU an ATS block's overhead is its op count, not its arithmetic: the selection (class-attention x
value-norm scores, ATS Sec. 3.1 Eq. 3; the redundancy discount; the stable Top-K; the gathers of the kept slots;
each dropped token's most similar kept token) and the size-weighted fusion (ToMe Sec. 3) take ~50 torch ops on
vectors of a few hundred floats. Measured on DeiT-S with redundancy-discounted, fused Top-K in blocks 0-10, the
block's overhead over the zero-overhead ceiling was ~0.7 ms, in ops of 5-15 µs each (dispatch, allocation and Python
included). ``ravit::topk_select`` does the selection in one op, ``ravit::fuse_nearest`` the fusion in another; no
library has these for ATS, hence the C++. A batch runs its images in a parallel loop; static Top-K keeps every
image's slots filled, so a batch takes the lean route too (without the kernels it takes the general executor, with
masks and batched gathers: on DeiT-S at batch 64 and 0.44x, 0.86 of the GMACs cut became speed, 0.98-1.02 with the
kernels).

The kernels compute the same selection as the torch ops (ties to the earlier token, bit-equal scores for equal
tokens), the outputs within fp32 rounding. They run for fp32 CPU inference (no autograd, no autocast) outside graph
capture, the selection on hosts without a position bias (timm ViT, Eva); everything else takes the torch ops.
"""

from __future__ import annotations

import torch

from ravit.layers import cpu_kernels
from ravit.layers.cpu_inference import fast_inference

__all__ = ["applies", "fuse_nearest", "topk_select"]


def applies(x: torch.Tensor) -> bool:
    """Whether a forward on the (B, L, C) tokens ``x`` may run the kernels: FAN's fused-inference conditions
    (:func:`~ravit.layers.cpu_inference.fast_inference`: a CPU tensor, no autograd, not inside ``torch.compile`` or a
    dispatch mode, so ``FlopCounterMode`` counts the torch ops' matrix products and GMACs do not depend on the path),
    and fp32 outside autocast, export and TorchScript tracing (which have no shape function for them), the library
    built. Asked once per forward: at batch 1 every Python statement in a block costs."""
    return (fast_inference(x, training=False) and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_exporting() and not torch.jit.is_tracing() and cpu_kernels.available())


def topk_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, size: torch.Tensor,
                ids: torch.Tensor, scale: float, num_prefix: int, width: int, value_norm: bool, redundancy: float,
                fuse: bool) -> tuple[torch.Tensor, ...]:
    """The selection of :func:`~ravit.ats.padded.filled_topk_forward` in one op, for a host without position bias;
    each image on its own (a parallel loop over the batch).

    q, k, v (B, H, L, D) with unit stride along D; x (B, L, C) with unit stride along C; size, ids (B, L). Returns the
    kept slots' index (B, P + width), q (B, H, P + width, D), x (B, P + width, C), size and ids (B, P + width), and
    with ``fuse`` the dropped slots (B, M), the output slot (B, M) each is fused into and the (B, L) log sizes
    (proportional attention, in the scores too); three empty tensors without ``fuse``."""
    return torch.ops.ravit.topk_select(q, k, v, x, size, ids, scale, num_prefix, width, value_norm, redundancy, fuse)


def fuse_nearest(x: torch.Tensor, size: torch.Tensor, x_in: torch.Tensor, size_in: torch.Tensor,
                 dropped: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each ``dropped`` slot (B, M) of the block input ``x_in`` (B, L, C) (sizes ``size_in``, contiguous) averaged by
    size into its ``target`` slot (B, M) of the kept, contiguous ``x`` (B, W, C) (sizes ``size``): returns ``x``,
    updated in place, and the (B, W) sizes."""
    B = x.shape[0]  # the torch selection (one image) gives (M,) vectors
    return x, torch.ops.ravit.fuse_nearest(x, size, x_in, size_in, dropped.view(B, -1), target.view(B, -1))
