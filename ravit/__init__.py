"""ravit: Robust & Adaptive Vision Transformers.

- FAN (Zhou et al., "Understanding The Robustness in Vision Transformers", ICML 2022): timm-native model family.
- ATS (Fayyaz et al., "Adaptive Token Sampling For Efficient Vision Transformers", ECCV 2022): a plug-in for timm ViTs.
- Tools that check both: corruption benchmarks, GMACs/throughput, token-grouping analysis, training.
"""

__version__ = "0.1.0"
