"""Part 3 of the study, FAN's grouping analysis (Zhou et al., ICML 2022, Sec. 3, Fig. 3): per block, the number of
significant eigenvalues of the output tokens' affinity (ravit's definition, :mod:`ravit.analysis.spectra`: the paper
never published its own) and the relative change of the block's output under Gaussian input noise
(:mod:`ravit.analysis.perturbation`), on the same images for both models."""

from __future__ import annotations

from torch import nn
from tqdm import tqdm

from ravit.analysis.perturbation import perturbation_profile
from ravit.analysis.spectra import grouping_spectra
from ravit.study._images import test_images

__all__ = ["measure_grouping"]


def measure_grouping(models: dict[str, nn.Module], labels: dict[str, str], n_images: int, noise_std: float,
             progress: bool) -> dict:
    """``{model name: {"significant_eigenvalues": {block: mean}, "relative_perturbation": {block: mean}}}``, the
    blocks in order (block names as the model's modules, ``blocks.0`` first)."""
    result = {}
    bar = tqdm(total=2 * len(models), disable=not progress)
    for name, model in models.items():
        spec, images, _ = test_images(model, n_images)  # read once per model, used by both measures
        batches = list(spec.normalize(images).to(next(model.parameters()).device).split(32))  # (b, C, H, W) each
        bar.set_description(f"{labels[name]} · grouping · eigenvalues")
        counts = grouping_spectra(model, batches)
        bar.update()
        bar.set_description(f"{labels[name]} · grouping · perturbation")
        perturb = perturbation_profile(model, batches, noise_std=noise_std)
        bar.update()
        result[name] = {
            "significant_eigenvalues": {k: float(v.float().mean()) for k, v in counts.items()},
            "relative_perturbation": {k: float(v.mean()) for k, v in perturb.items() if k != "input"},
        }
    bar.close()
    return result

