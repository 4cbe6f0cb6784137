"""Adaptive Token Sampling (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022,
arXiv 2111.15667) as a parameter-free plug-in for timm ViTs (VisionTransformer, Eva, Beit) and ravit's FAN-ViT /
FAN-Hybrid.

- :mod:`ravit.ats.sampling`: pure functions (class-attention scores, inverse transform sampling, top-K);
- :mod:`ravit.ats.config`: placement, budget, schedule, fusion and static-shape validation;
- :mod:`ravit.ats.block`: a timm block on ragged tokens, kept queries only, on SDPA (the paper's algorithm, exact);
- :mod:`ravit.ats.padded`: blocks on padded slots with token sizes (``static``, ``fuse`` and the Eva/Beit hosts);
- :mod:`ravit.ats.hosts`: what differs per host family (positions, layer scale, attention output);
- :mod:`ravit.ats.fan`: FAN blocks on slots of a token grid (received-attention scores, the depthwise conv's grid,
  masked channel attention and class attention), shared with ToMe on FAN;
- :mod:`ravit.ats.patch`: ``apply_ats`` / ``remove_ats``;
- :mod:`ravit.ats.trace`: per-image kept tokens and GMACs.
"""

from ravit.ats.config import SAMPLERS, ATSConfig, parse_budget
from ravit.ats.patch import SUPPORTED, UnsupportedModelError, apply_ats, has_ats, remove_ats
from ravit.ats.sampling import class_attention_scores, inverse_transform_sampling, samples_per_image, topk_sampling
from ravit.ats.trace import ATSTrace, trace

__all__ = [
    "ATSConfig",
    "ATSTrace",
    "SAMPLERS",
    "SUPPORTED",
    "UnsupportedModelError",
    "apply_ats",
    "class_attention_scores",
    "has_ats",
    "inverse_transform_sampling",
    "parse_budget",
    "remove_ats",
    "samples_per_image",
    "topk_sampling",
    "trace",
]
