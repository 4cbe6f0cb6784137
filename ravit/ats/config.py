"""ATS placement and budget (Fayyaz et al., ECCV 2022, Sec. 3 and Sec. 4.2 "single-stage vs multi-stage").

One meaning per type: ``None`` = the released default (K = the original patch count at every ATS block, "all
tokens"); ``int`` = K, the number of points sampled on the y-axis (patch tokens; prefix tokens are always kept on top);
``float`` in (0, 1] = K as that fraction of the patch tokens entering the block. A sequence gives one value per block.
A float above 1 counts tokens only when it is a whole number (``3.0`` is 3 tokens; ``2.5`` is an error, never rounded).

Options beyond the paper (ravit's, measured against ToMe in ``benchmarks/token_reduction.py``; the defaults are the
paper's algorithm):

- ``schedule="linear"``: one budget is the patch-token count left after the *last* ATS block (a ratio is then a
  fraction of the *original* patch tokens, never of the tokens entering a block), and the count falls linearly over
  the ATS blocks, ``K_j = round(N - (N - K) (j + 1) / S)`` for the j-th of S blocks, as ToMe's constant ``r`` does.
  The default ``"each"`` gives every ATS block the budget, a ratio then compounding block after block.
- ``fuse="nearest"``: a dropped token is not lost but averaged into its most similar kept token (cosine similarity
  of the attention keys averaged over heads, weighted by how many tokens each already holds, EViT/ToMe-style), and
  later blocks use proportional attention (each key's logit + log of its token count, ToMe Sec. 3).
- ``score_power=p``: the sampler sees score^p. 1 is the paper's; p < 1 flattens the scores' CDF, so the K points of
  inverse transform sampling land on more distinct tokens (fewer merge as duplicates) and cover more of the image.
  Top-K's order does not change with p, so Top-K refuses p != 1.
- ``redundancy=gamma``: each token's score is multiplied by (1 - c)^gamma, c its largest key similarity to a more
  important token (:func:`~ravit.ats.sampling.redundancy_discount`, a soft non-maximum suppression), so a token that
  a kept one already represents is dropped first and, with ``fuse="nearest"``, averaged into it: ToMe's insight
  that merging near-duplicates costs little, inside ATS's importance ranking. 0 (off) is the paper's. Applied
  before ``score_power``. Measured on the 12-block zoo ViT (all 10,000 test images, fused Top-K, linear schedule
  from block 0 to 1 token, 0.50x GMACs): 88.1% without, 90.4% with gamma = 6.
- ``static=True``: every image leaves an ATS block in exactly K slots (kept tokens first, empty slots masked out
  of attention), so tensor shapes depend only on the budget and the model exports (``torch.export``, ONNX,
  ``torch.compile(fullgraph=True)``). Needs int budgets (or ``schedule="linear"``, which resolves to ints).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ravit.ats.sampling import inverse_transform_sampling, topk_sampling
from ravit.errors import InvalidArgumentError

__all__ = ["ATSConfig", "FUSIONS", "SAMPLERS", "SCHEDULES", "SCORES", "Budget", "Sampler", "parse_budget"]

Budget = int | float | None
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS: dict[str, Sampler] = {"inverse_transform": inverse_transform_sampling, "topk": topk_sampling}
SCHEDULES = ("each", "linear")
FUSIONS = ("none", "nearest")
# What ranks the tokens: class attention x value norm (ATS Eq. 3) or the class attention alone (Sec. 4.3 ablation).
SCORES = ("attention_value", "attention")


_BUDGET_RULE = "a budget is 'none', a token count (an integer >= 1) or a ratio in (0, 1]"


def parse_budget(text: str) -> Budget:
    """One budget as written on a command line: ``none``/``all`` -> None, ``7`` -> 7 tokens, ``0.5`` -> a ratio.

    The text's form decides between the two meanings of 1: ``1`` is one token, ``1.0`` all of them. Ranges are
    checked against the model by :meth:`ATSConfig.build`.
    """
    if text.strip().lower() in ("none", "all"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgumentError(f"{_BUDGET_RULE}, got {text!r}") from None
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{_BUDGET_RULE}, got {text!r}")
    return value


def _check_budget(value: object, num_patches: int) -> Budget:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"budget must be None, an int token count or a float ratio in (0, 1], got {value!r}")
    if not isinstance(value, numbers.Integral) and float(value) > 1.0 and float(value).is_integer():
        value = int(value)  # 3.0 tokens is 3 tokens
    if isinstance(value, numbers.Integral):
        if not 1 <= int(value) <= num_patches:
            raise InvalidArgumentError(
                f"budget {int(value)} is out of range: an int budget counts sampled patch tokens, 1..{num_patches} "
                f"for this model (prefix tokens are always kept on top)"
            )
        return int(value)
    if not 0.0 < float(value) <= 1.0:
        raise InvalidArgumentError(
            f"budget {float(value)} is out of range: {_BUDGET_RULE} (a fraction above 1 is neither; it is never "
            f"rounded to a count)")
    return float(value)


def _check_some_patch_left(blocks: Sequence[int], budgets: Sequence[Budget], num_patches: int) -> None:
    """A ratio that rounds to no token even when every earlier ATS block keeps all it may would keep no patch token
    (the sampler then keeps one token whatever the ratio says): refuse it instead of changing its meaning."""
    most = num_patches  # an upper bound on the patch tokens entering the block: sampling keeps K' <= K (Sec. 3.2)
    for block, budget in zip(blocks, budgets, strict=True):
        if isinstance(budget, float):
            k = round(most * budget)
            if k < 1:
                raise InvalidArgumentError(
                    f"budget ratio {budget} at ATS block {block} leaves no patch token: at most {most} tokens enter "
                    f"it and round({most} x {budget}) = 0; use a larger ratio, an int count or fewer ATS blocks")
            most = min(most, k)
        elif budget is not None:
            most = min(most, budget)


def _linear_schedule(budget: object, num_blocks: int, num_patches: int) -> list[int]:
    """``schedule="linear"``: per-block counts falling linearly from the original patch count to ``budget``."""
    if budget is None or isinstance(budget, (list, tuple)):
        raise InvalidArgumentError(
            f"schedule='linear' takes one budget (the patch tokens left after the last ATS block: an int count or a "
            f"ratio of the original {num_patches}), got {budget!r}")
    final = _check_budget(budget, num_patches)
    if isinstance(final, float):
        final = round(final * num_patches)
        if final < 1:
            raise InvalidArgumentError(
                f"budget ratio {budget} leaves no patch token: round({num_patches} x {budget}) = 0")
    return [round(num_patches - (num_patches - final) * (j + 1) / num_blocks) for j in range(num_blocks)]


@dataclass(frozen=True)
class ATSConfig:
    """Validated ATS settings for one model: which blocks sample tokens, each block's budget, and the sampler."""

    blocks: tuple[int, ...]
    budgets: tuple[Budget, ...]
    sampler: str | Sampler
    schedule: str = "each"
    fuse: str = "none"
    static: bool = False
    score: str = "attention_value"
    score_power: float = 1.0
    redundancy: float = 0.0

    @property
    def padded(self) -> bool:
        """True when the blocks run on padded slots with token sizes (static, fused or redundancy-discounted), not on
        ragged tokens (the paper's modes only)."""
        return self.static or self.fuse != "none" or self.redundancy > 0

    @classmethod
    def build(
        cls,
        blocks: Iterable[int],
        budget: Budget | Sequence[Budget],
        sampler: str | Sampler,
        depth: int,
        num_patches: int,
        schedule: str = "each",
        fuse: str = "none",
        static: bool = False,
        score: str = "attention_value",
        score_power: float = 1.0,
        redundancy: float = 0.0,
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

        if schedule not in SCHEDULES:
            raise InvalidArgumentError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
        if fuse not in FUSIONS:
            raise InvalidArgumentError(f"unknown fuse {fuse!r}; choose one of {list(FUSIONS)}")
        if score not in SCORES:
            raise InvalidArgumentError(f"unknown score {score!r}; choose one of {list(SCORES)}")
        if not isinstance(static, bool):
            raise InvalidArgumentError(f"static must be True or False, got {static!r}")
        if schedule == "linear":  # counts fall along the blocks in depth order, whatever order they were given in
            falling = dict(zip(sorted(blocks), _linear_schedule(budget, len(blocks), num_patches), strict=True))
            budget = [falling[b] for b in blocks]
        if isinstance(budget, (list, tuple)):
            if len(budget) != len(blocks):
                raise InvalidArgumentError(
                    f"got {len(budget)} budgets for {len(blocks)} ATS blocks; give one per block")
            budgets = [_check_budget(v, num_patches) for v in budget]
        else:
            budgets = [_check_budget(budget, num_patches)] * len(blocks)
        pairs = sorted(zip((int(b) for b in blocks), budgets, strict=True), key=lambda p: p[0])
        _check_some_patch_left([b for b, _ in pairs], [v for _, v in pairs], num_patches)
        if static and not all(isinstance(v, int) for _, v in pairs):
            raise InvalidArgumentError(
                f"static=True needs a fixed token count per ATS block (shapes must depend on the budget only), got "
                f"budgets {[v for _, v in pairs]}: give int counts, or a ratio with schedule='linear' (a fraction "
                f"of the original patch tokens)")

        if isinstance(score_power, bool) or not isinstance(score_power, numbers.Real) or not (
                0 < float(score_power) < math.inf):
            raise InvalidArgumentError(f"score_power must be a finite number > 0, got {score_power!r}")
        if isinstance(redundancy, bool) or not isinstance(redundancy, numbers.Real) or not (
                0 <= float(redundancy) < math.inf):
            raise InvalidArgumentError(f"redundancy must be a finite number >= 0 (0: off), got {redundancy!r}")
        if sampler == "topk" and float(score_power) != 1.0:
            raise InvalidArgumentError(
                f"score_power={score_power} does nothing with sampler='topk' (a power keeps the scores' order); use "
                f"it with inverse_transform sampling")
        if isinstance(sampler, str):
            if sampler not in SAMPLERS:
                raise InvalidArgumentError(
                    f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)} or pass a callable")
        elif not callable(sampler):
            raise InvalidArgumentError(f"sampler must be a name {sorted(SAMPLERS)} or a callable, got {sampler!r}")
        return cls(blocks=tuple(b for b, _ in pairs), budgets=tuple(v for _, v in pairs), sampler=sampler,
                   schedule=schedule, fuse=fuse, static=static, score=score, score_power=float(score_power),
                   redundancy=float(redundancy))

    def with_power(self, keep: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                   ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``keep(scores, valid)`` fed score^``score_power`` (``keep`` itself at the paper's power 1)."""
        if self.score_power == 1.0:
            return keep
        return functools.partial(_powered, keep, self.score_power)

    def sampler_fn(self) -> Sampler:
        """The sampler to call; a user's callable comes wrapped in a check of what it returns."""
        return SAMPLERS[self.sampler] if isinstance(self.sampler, str) else functools.partial(_checked, self.sampler)


def _powered(keep, power: float, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return keep(scores.clamp(min=0) ** power, valid)  # (B, N) scores are >= 0; clamp guards -0.0


def _checked(sampler: Sampler, scores: torch.Tensor, valid: torch.Tensor, n_samples: torch.Tensor) -> torch.Tensor:
    """Run a user's sampler and refuse a result that is not a (B, N) bool mask or keeps no patch token of an image
    (the built-in samplers keep at least one by construction)."""
    keep = sampler(scores, valid, n_samples)
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != scores.shape:
        got = f"{keep.dtype} {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
        raise InvalidArgumentError(f"an ATS sampler must return a bool mask of shape {tuple(scores.shape)}, got {got}")
    if not bool((keep & valid).any(dim=1).all()):
        raise InvalidArgumentError("the ATS sampler kept no patch token of an image; it must keep at least one")
    return keep
