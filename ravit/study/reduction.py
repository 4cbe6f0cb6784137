"""Part 2 of the study, ATS's claims (Fayyaz et al., ECCV 2022, Sec. 4): accuracy against GMACs per image of the ViT
with every token-reduction setting the claims compare, on the same images, no fine-tuning unless named.

Methods (``method`` in the rows; ATS blocks "first..last" are the paper's placement, blocks 3-11 of a 12-block ViT):

- ``dense``: the ViT as trained.
- ``ats``: ATS as the paper runs it: inverse-transform sampling in every block from the first ATS block on, scores
  class attention x value norm (Eq. 3), each budget K per block (Sec. 3; "all" is the released default).
- ``ats_single`` / ``topk_single``: one ATS block only (the first), inverse transform or Top-K (Sec. 4.2 a and c).
- ``ats_attention``: as ``ats``, scored by the class attention alone (Sec. 4.3).
- ``random``: as ``ats``, keeping a random subset of the budget's size (Sec. 4.3's random baseline; seeded).
- ``tome``: Token Merging (Bolya et al., ICLR 2023) with r merges per block, ravit's :mod:`ravit.tome`.
- ``ats_fused_linear``: ravit's ATS options (:mod:`ravit.ats.config`): Top-K on the ATS scores, the count falling
  linearly to the final budget, dropped tokens averaged into their nearest kept token.
- ``ats_flat_fused``: the same with inverse transform sampling on score^0.5 (``score_power=0.5``: a flatter CDF,
  so the samples land on more distinct tokens): with fusion, the best mode of ``benchmarks/token_reduction.py`` on
  the 12-block zoo models below 0.6x GMACs, where Top-K fused cannot go at the paper's placement.
- ``ats_redundant_fused``: ``ats_fused_linear`` with ``redundancy=6`` (each score times (1 - its largest key
  similarity to a more important token)^6: near-duplicates of kept tokens are dropped first and merge into them).
- ``ats_finetuned``: ``ats`` on the ViT fine-tuned with ATS in the loop (Sec. 4.2 b).

The FAN gets its own sweep (:func:`measure_fan_reduction`, ``FAN_METHODS``): ``dense``, ``ats``,
``ats_fused_linear``, ``ats_flat_fused`` and ``ats_redundant_fused`` as above through :mod:`ravit.ats.fan` (tokens
scored by the attention they receive, FAN blocks having no class token), and ``tome`` through :mod:`ravit.tome.fan`.

GMACs are counted with ``FlopCounterMode`` on the first ``gmacs_images`` images and averaged. The ragged ATS path
computes each image on its own tokens, so one counted forward of the batch gives the sum of the per-image counts
(checked in the tests); the padded (fused) path pads to the batch's widest image, so its images are counted alone
(:func:`ravit.ats.trace`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ravit.ats import apply_ats, has_ats, trace
from ravit.ats.config import Budget
from ravit.ats.sampling import topk_sampling
from ravit.bench.flops import count_flops
from ravit.models.fan import FAN
from ravit.study._images import test_images
from ravit.tome import apply_tome

__all__ = [
    "FAN_METHODS", "METHODS", "Setting", "fan_settings", "first_ats_block", "measure_fan_reduction",
    "measure_reduction", "random_sampler", "settings",
]

# Display names, in the order the tables and the figure list them.
METHODS = {
    "dense": "dense ViT",
    "ats": "ATS (multi-stage)",
    "ats_single": "ATS single-stage",
    "topk_single": "Top-K single-stage",
    "ats_attention": "ATS, class attention only",
    "random": "random tokens (multi-stage)",
    "tome": "ToMe",
    "ats_fused_linear": "ATS Top-K, fused, linear (ravit)",
    "ats_flat_fused": "ATS on score^0.5, fused, linear (ravit)",
    "ats_redundant_fused": "ATS Top-K, redundancy 6, fused, linear (ravit)",
    "ats_finetuned": "ATS, fine-tuned ViT",
}


# The FAN's sweep (ravit's ATS and ToMe on FAN, :mod:`ravit.ats.fan`): no paper measured these.
FAN_METHODS = {
    "dense": "dense FAN",
    "ats": "ATS on FAN (multi-stage)",
    "ats_fused_linear": "ATS on FAN, Top-K fused linear (ravit)",
    "ats_flat_fused": "ATS on FAN, score^0.5, fused linear (ravit)",
    "ats_redundant_fused": "ATS on FAN, Top-K, redundancy 6, fused linear (ravit)",
    "tome": "ToMe on FAN",
}


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: ``method``, the budget as shown (``label``), which ViT it runs on ("vit" or
    "vit_ats", the fine-tuned one), and the plug-in's keyword arguments (``ats`` or ``tome``; none for dense)."""

    method: str
    label: str
    model: str = "vit"
    ats: dict = field(default_factory=dict)
    tome: int | None = None


def first_ats_block(depth: int) -> int:
    """The paper's first ATS block scaled to ``depth``: block 3 of DeiT-S's 12 (ATS Sec. 4), block 1 of 4."""
    return max(1, round(depth / 4))


def random_sampler(seed: int = 0):
    """A sampler keeping min(K, valid) uniformly random patch tokens per image: ATS Sec. 4.3's random baseline.

    Each call draws from a generator seeded with ``seed`` and the row width, so a run is reproducible.
    """
    def sample(scores: torch.Tensor, valid: torch.Tensor, n_samples: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + scores.shape[1])
        noise = torch.rand(scores.shape, generator=g).to(scores.device)  # (B, N) random ranks
        return topk_sampling(noise, valid, n_samples)
    return sample


def _label(budget: Budget) -> str:
    return "all" if budget is None else f"{budget:g}"


def _tome_rs(depth: int, num_patches: int) -> list[int]:
    """Five r values up to 2N/depth (beyond that every block merges all it can)."""
    top = 2 * num_patches // depth
    return sorted({round(top * f) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)} - {0})


def settings(depth: int, num_patches: int, budgets: Sequence[Budget], finetuned: bool, quick: bool) -> list[Setting]:
    """The sweep for a ViT of ``depth`` blocks and ``num_patches`` patch tokens; ``budgets`` are the ``ats`` ones."""
    first = first_ats_block(depth)
    multi = list(range(first, depth))
    single = (None, 0.5, 0.2) if quick else (None, 0.7, 0.5, 0.35, 0.2)
    topk = (0.7, 0.5, 0.2) if quick else (0.9, 0.7, 0.5, 0.35, 0.2)
    rand = (0.9, 0.7) if quick else (0.95, 0.9, 0.8, 0.7)
    fused = (0.5, 0.05) if quick else (0.5, 0.25, 0.1, 0.02)
    rs = _tome_rs(depth, num_patches)
    rs = rs[::2] if quick else rs
    out = [Setting("dense", "all")]
    out += [Setting("ats", _label(b), ats=dict(blocks=multi, budget=b)) for b in budgets]
    out += [Setting("ats_single", _label(b), ats=dict(blocks=[first], budget=b)) for b in single]
    out += [Setting("topk_single", _label(b), ats=dict(blocks=[first], budget=b, sampler="topk")) for b in topk]
    out += [Setting("ats_attention", _label(b), ats=dict(blocks=multi, budget=b, score="attention")) for b in budgets]
    out += [Setting("random", _label(b), ats=dict(blocks=multi, budget=b, sampler="random")) for b in rand]
    out += [Setting("tome", f"r={r}", tome=r) for r in rs]
    out += [Setting("ats_fused_linear", f"→{b:g}", ats=dict(blocks=multi, budget=b, sampler="topk",
                                                             schedule="linear", fuse="nearest")) for b in fused]
    out += [Setting("ats_flat_fused", f"→{b:g}", ats=dict(blocks=multi, budget=b, schedule="linear", fuse="nearest",
                                                           score_power=0.5)) for b in fused]
    out += [Setting("ats_redundant_fused", f"→{b:g}", ats=dict(blocks=multi, budget=b, sampler="topk",
                                                                schedule="linear", fuse="nearest", redundancy=6.0))
            for b in fused]
    if finetuned:
        out += [Setting("ats_finetuned", _label(b), model="vit_ats", ats=dict(blocks=multi, budget=b))
                for b in budgets]
    return out


def fan_settings(depth: int, num_patches: int, budgets: Sequence[Budget], quick: bool) -> list[Setting]:
    """The FAN's sweep: ATS as the paper runs it (the ViT's budgets and placement), ATS Top-K and ATS on score^0.5
    fused with the linear schedule, and ToMe, on the FAN (``model`` "fan")."""
    multi = list(range(first_ats_block(depth), depth))
    fused = (0.5, 0.05) if quick else (0.5, 0.25, 0.1, 0.02)
    rs = _tome_rs(depth, num_patches)
    out = [Setting("dense", "all", model="fan")]
    out += [Setting("ats", _label(b), model="fan", ats=dict(blocks=multi, budget=b)) for b in budgets]
    out += [Setting("ats_fused_linear", f"→{b:g}", model="fan", ats=dict(
        blocks=multi, budget=b, sampler="topk", schedule="linear", fuse="nearest")) for b in fused]
    out += [Setting("ats_flat_fused", f"→{b:g}", model="fan", ats=dict(
        blocks=multi, budget=b, schedule="linear", fuse="nearest", score_power=0.5)) for b in fused]
    out += [Setting("ats_redundant_fused", f"→{b:g}", model="fan", ats=dict(
        blocks=multi, budget=b, sampler="topk", schedule="linear", fuse="nearest", redundancy=6.0)) for b in fused]
    out += [Setting("tome", f"r={r}", model="fan", tome=r) for r in (rs[::2] if quick else rs)]
    return out


def _build(model: nn.Module, setting: Setting) -> nn.Module:
    model = copy.deepcopy(model)
    if setting.tome is not None:
        return apply_tome(model, setting.tome)
    if setting.ats:
        kwargs = dict(setting.ats)
        if kwargs.get("sampler") == "random":
            kwargs["sampler"] = random_sampler()
        return apply_ats(model, **kwargs)
    return model


@torch.no_grad()
def mean_gmacs(model: nn.Module, images: torch.Tensor) -> float:
    """Mean GMACs per image of ``model`` over ``images`` (B, C, H, W), each image counted as if it ran alone."""
    if has_ats(model) and (model.ats_config.padded or isinstance(model, FAN)):  # slots padded to the widest image
        return float(trace(model, images).gmacs.mean())
    return count_flops(model, images) / 2e9 / images.shape[0]


@torch.no_grad()
def _sweep(models: dict[str, nn.Module], plan: list[Setting], names: dict[str, str], label: str, limit: int,
           batch_size: int, gmacs_images: int, progress: bool) -> dict:
    """Every setting of ``plan`` on the first ``limit`` test images: rows of method, setting, accuracy, GMACs and
    GMACs / dense (the plan's first setting)."""
    first = models[plan[0].model]
    spec, images, labels = test_images(first, limit)
    inputs = spec.normalize(images).to(next(first.parameters()).device)  # (N, C, H, W)
    rows, dense_gmacs = [], None
    bar = tqdm(plan, disable=not progress)
    for setting in bar:
        bar.set_description(f"{label} · token reduction · {names[setting.method]} {setting.label}")
        model = _build(models[setting.model], setting)
        preds = torch.cat([model(x).argmax(-1).cpu() for x in inputs.split(batch_size)])
        gmacs = mean_gmacs(model, inputs[:gmacs_images])
        dense_gmacs = gmacs if dense_gmacs is None else dense_gmacs
        rows.append({
            "method": setting.method,
            "setting": setting.label,
            "accuracy": float(preds.eq(labels).float().mean()),
            "gmacs": gmacs,
            "gmacs_ratio": gmacs / dense_gmacs,
        })
    depth = len(first.blocks)
    return {"first_ats_block": first_ats_block(depth), "depth": depth,
            "gmacs_images": min(gmacs_images, len(labels)), "images": len(labels), "rows": rows}


def measure_reduction(vits: dict[str, nn.Module], label: str, limit: int, budgets: Sequence[Budget], batch_size: int,
                      gmacs_images: int, quick: bool, progress: bool) -> dict:
    """The ViT's sweep (:func:`settings`); ``vits`` holds "vit" and, optionally, "vit_ats" (the fine-tuned ViT)."""
    vit = vits["vit"]
    plan = settings(len(vit.blocks), vit.patch_embed.num_patches, budgets, "vit_ats" in vits, quick)
    return _sweep(vits, plan, METHODS, label, limit, batch_size, gmacs_images, progress)


def measure_fan_reduction(fan: nn.Module, label: str, limit: int, budgets: Sequence[Budget], batch_size: int,
                          gmacs_images: int, quick: bool, progress: bool) -> dict:
    """The FAN's sweep (:func:`fan_settings`), on the same images as the ViT's."""
    plan = fan_settings(len(fan.blocks), fan.patch_embed.num_patches, budgets, quick)
    return _sweep({"fan": fan}, plan, FAN_METHODS, label, limit, batch_size, gmacs_images, progress)
