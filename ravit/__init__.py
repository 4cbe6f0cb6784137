"""ravit: Robust & Adaptive Vision Transformers.

- FAN (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022): timm-native model family.
- ATS (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022): a plug-in for timm ViTs,
  and ToMe (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023) beside it as the baseline.
- Tools that check both: corruption benchmarks, GMACs/throughput, token-grouping analysis, training.
"""

__version__ = "0.1.0"

from . import models  # noqa: E402,F401  (registers the FAN families in timm)
from . import robustness as robustness  # noqa: E402  (ravit.robustness.corrupt, evaluation, metrics)
from ._factory import create_model as create_model  # noqa: E402
from ._factory import list_models as list_models  # noqa: E402
from .ats import apply_ats as apply_ats  # noqa: E402
from .ats import remove_ats as remove_ats  # noqa: E402
from .checkpoint import load_checkpoint as load_checkpoint  # noqa: E402
from .checkpoint import save_checkpoint as save_checkpoint  # noqa: E402
from .robustness import corrupt as corrupt  # noqa: E402
from .tome import apply_tome as apply_tome  # noqa: E402
from .tome import remove_tome as remove_tome  # noqa: E402
