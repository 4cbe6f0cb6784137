"""How input noise propagates through the blocks (FAN paper, Sec. 3 / Fig. 3: noise decays where tokens group).

For an image x and Gaussian noise delta ~ N(0, noise_std^2) in the model's (normalised) input space, each block's
output f gets the relative perturbation ``||f(x + delta) - f(x)||_F / ||f(x)||_F`` over its patch tokens, per image.
The paper's exact noise strength is unknown; ``noise_std`` is a parameter, and ``input`` in the result holds the same
ratio for the input itself so that the per-block numbers can be read against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ravit.analysis.features import Method, block_outputs
from ravit.errors import InvalidArgumentError

__all__ = ["block_perturbation", "perturbation_profile", "relative_change"]


def relative_change(clean: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``||perturbed - clean|| / ||clean||`` per sample over all but the first dim: (B, ...) -> (B,)."""
    if clean.shape != perturbed.shape:
        raise InvalidArgumentError(f"shapes differ: {tuple(clean.shape)} vs {tuple(perturbed.shape)}")
    diff = (perturbed - clean).flatten(1).double().norm(dim=1)
    return (diff / clean.flatten(1).double().norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)).float()


@torch.no_grad()
def block_perturbation(
    model: nn.Module,
    images: torch.Tensor,
    noise: torch.Tensor,
    indices: Sequence[int] | None = None,
    method: Method = "auto",
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Relative perturbation of each selected block's output when ``noise`` is added to ``images``.

    Returns ``{'input': (B,), block name: (B,), ...}``. A zero ``noise`` gives exactly 0 for a deterministic model
    (eval mode).
    """
    if noise.shape != images.shape:
        raise InvalidArgumentError(f"noise shape {tuple(noise.shape)} differs from images {tuple(images.shape)}")
    clean = block_outputs(model, images, indices=indices, method=method, names=names)
    noisy = block_outputs(model, images + noise, indices=indices, method=method, names=names)
    result = {"input": relative_change(images, images + noise)}
    for name, a, b in zip(clean.names, clean.tokens, noisy.tokens, strict=True):
        result[name] = relative_change(a, b)
    return result


@torch.no_grad()
def perturbation_profile(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    noise_std: float,
    seed: int = 0,
    indices: Sequence[int] | None = None,
    method: Method = "auto",
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`block_perturbation` over a dataset with Gaussian noise of std ``noise_std``: ``{name: (n_images,)}``.

    The noise comes from a generator seeded with ``seed``, so reruns and different ``noise_std`` values use the
    same noise directions (the measure then grows smoothly with ``noise_std``).
    """
    if noise_std < 0:
        raise InvalidArgumentError(f"noise_std must be >= 0, got {noise_std}")
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, list[torch.Tensor]] = {}
    for images in batches:
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype) * noise_std
        for name, values in block_perturbation(model, images, noise, indices, method, names).items():
            results.setdefault(name, []).append(values.cpu())
    if not results:
        raise InvalidArgumentError("no images to analyse")
    return {name: torch.cat(values) for name, values in results.items()}
