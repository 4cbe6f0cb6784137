"""Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023, arXiv 2210.09461) as a
parameter-free plug-in for timm ViTs and ravit's FAN-ViT / FAN-Hybrid: a static token-reduction baseline next to
:mod:`ravit.ats`.

- :mod:`ravit.tome.matching`: pure functions (bipartite soft matching, size-weighted merging);
- :mod:`ravit.tome.block`: a timm block that merges r tokens between attention and MLP, with proportional attention;
- :mod:`ravit.tome.fan`: merging on FAN blocks (a merged token holds all its grid positions, :mod:`ravit.ats.fan`);
- :mod:`ravit.tome.patch`: ``apply_tome`` / ``remove_tome`` / ``has_tome``.
"""

from ravit.tome.matching import Matching, bipartite_soft_matching, max_merges, merge_weighted
from ravit.tome.patch import SUPPORTED, ToMeConfig, apply_tome, has_tome, remove_tome

__all__ = [
    "Matching",
    "SUPPORTED",
    "ToMeConfig",
    "apply_tome",
    "bipartite_soft_matching",
    "has_tome",
    "max_merges",
    "merge_weighted",
    "remove_tome",
]
