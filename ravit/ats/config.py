"""ATS placement and budget (Fayyaz et al., ECCV 2022, Sec. 3 and Sec. 4.2 "single-stage vs multi-stage").

One meaning per type: ``None`` = the released default (K = the original patch count at every ATS block, "all
tokens"); ``int`` = K, the number of points sampled on the y-axis (patch tokens; prefix tokens are always kept on top);
``float`` in (0, 1] = K as that fraction of the patch tokens entering the block. A sequence gives one value per block.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ravit.ats.sampling import inverse_transform_sampling, topk_sampling
from ravit.errors import InvalidArgumentError

__all__ = ["ATSConfig", "SAMPLERS", "Budget", "Sampler"]

Budget = int | float | None
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS: dict[str, Sampler] = {"inverse_transform": inverse_transform_sampling, "topk": topk_sampling}


def _check_budget(value: object, num_patches: int) -> Budget:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"budget must be None, an int token count or a float ratio in (0, 1], got {value!r}")
    if isinstance(value, numbers.Integral):
        if not 1 <= int(value) <= num_patches:
            raise InvalidArgumentError(
                f"budget {int(value)} is out of range: an int budget counts sampled patch tokens, 1..{num_patches} "
                f"for this model (prefix tokens are always kept on top)"
            )
        return int(value)
    if not 0.0 < float(value) <= 1.0:
        raise InvalidArgumentError(f"budget ratio {float(value)} is out of range (0, 1]; use an int for a token count")
    return float(value)


@dataclass(frozen=True)
class ATSConfig:
    """Validated ATS settings for one model: which blocks sample tokens, each block's budget, and the sampler."""

    blocks: tuple[int, ...]
    budgets: tuple[Budget, ...]
    sampler: str | Sampler

    @classmethod
    def build(
        cls,
        blocks: Iterable[int],
        budget: Budget | Sequence[Budget],
        sampler: str | Sampler,
        depth: int,
        num_patches: int,
    ) -> ATSConfig:
        """Validate user arguments against a model of ``depth`` blocks and ``num_patches`` patch tokens."""
        try:
            blocks = tuple(blocks)
        except TypeError:
            raise InvalidArgumentError(f"blocks must be an iterable of block indices, got {blocks!r}") from None
        if not blocks:
            raise InvalidArgumentError("blocks is empty: name at least one block to sample tokens in")
        for b in blocks:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise InvalidArgumentError(f"block indices must be ints, got {b!r}")
            if not 0 <= b < depth:
                raise InvalidArgumentError(f"ATS block {b} is out of range: this model has blocks 0..{depth - 1}")
        if len(set(blocks)) != len(blocks):
            raise InvalidArgumentError(f"ATS blocks must be unique, got {list(blocks)}")

        if isinstance(budget, (list, tuple)):
            if len(budget) != len(blocks):
                raise InvalidArgumentError(
                    f"got {len(budget)} budgets for {len(blocks)} ATS blocks; give one per block")
            budgets = [_check_budget(v, num_patches) for v in budget]
        else:
            budgets = [_check_budget(budget, num_patches)] * len(blocks)
        pairs = sorted(zip((int(b) for b in blocks), budgets, strict=True), key=lambda p: p[0])

        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise InvalidArgumentError(
                    f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)} or pass a callable")
        elif not callable(sampler):
            raise InvalidArgumentError(f"sampler must be a name {sorted(SAMPLERS)} or a callable, got {sampler!r}")
        return cls(blocks=tuple(b for b, _ in pairs), budgets=tuple(v for _, v in pairs), sampler=sampler)

    def sampler_fn(self) -> Sampler:
        return SAMPLERS[self.sampler] if isinstance(self.sampler, str) else self.sampler
