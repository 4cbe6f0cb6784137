"""Token-grouping analysis (FAN paper Sec. 3), attention maps and ATS token masks.

- :mod:`~ravit.analysis.features`: block outputs as patch-token grids (``forward_intermediates`` or removable hooks);
- :mod:`~ravit.analysis.spectra`: token affinity and its number of significant eigenvalues (our definition);
- :mod:`~ravit.analysis.perturbation`: relative change of block outputs under Gaussian input noise;
- :mod:`~ravit.analysis.clustering`: k-way spectral clustering of tokens as masks over the image;
- :mod:`~ravit.analysis.attention`: CLS / class-attention and token-mixing attention maps;
- :mod:`~ravit.analysis.ats_masks`: kept-token masks, kept-token histograms and GMACs of ATS models;
- :mod:`~ravit.analysis.plots`, :mod:`~ravit.analysis.results`: PNG figures, JSON / CSV files.
"""

from ravit.analysis.ats_masks import (
    ATSStatistics,
    ats_statistics,
    ats_token_masks,
    kept_token_histogram,
    kept_token_masks,
)
from ravit.analysis.attention import (
    attention_maps,
    cls_attention,
    model_has_cls_token,
    recording_attention,
    token_attention,
)
from ravit.analysis.clustering import cluster_masks, kmeans, labels_to_mask, spectral_clustering, spectral_embedding
from ravit.analysis.features import (
    BlockOutputs,
    block_names,
    block_outputs,
    capture_outputs,
    check_images,
    expected_image_size,
    input_channels,
    patch_grid,
)
from ravit.analysis.perturbation import block_perturbation, perturbation_profile, relative_change
from ravit.analysis.plots import plot_block_curves, plot_histogram, plot_image_maps, plot_token_histogram
from ravit.analysis.results import write_csv, write_json
from ravit.analysis.spectra import (
    affinity_spectrum,
    count_significant,
    grouping_spectra,
    normalized_affinity,
    significant_eigenvalues,
    token_affinity,
)

__all__ = [
    "ATSStatistics",
    "BlockOutputs",
    "affinity_spectrum",
    "ats_statistics",
    "ats_token_masks",
    "attention_maps",
    "block_names",
    "block_outputs",
    "block_perturbation",
    "capture_outputs",
    "check_images",
    "cls_attention",
    "cluster_masks",
    "count_significant",
    "expected_image_size",
    "grouping_spectra",
    "input_channels",
    "kept_token_histogram",
    "kept_token_masks",
    "kmeans",
    "labels_to_mask",
    "model_has_cls_token",
    "normalized_affinity",
    "patch_grid",
    "perturbation_profile",
    "plot_block_curves",
    "plot_histogram",
    "plot_image_maps",
    "plot_token_histogram",
    "recording_attention",
    "relative_change",
    "significant_eigenvalues",
    "spectral_clustering",
    "spectral_embedding",
    "token_affinity",
    "token_attention",
    "write_csv",
    "write_json",
]
