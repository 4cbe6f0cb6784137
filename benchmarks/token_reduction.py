"""Token reduction side by side: dense, every ATS mode, ATS Top-K and ToMe, on one model, in one run.

    python benchmarks/token_reduction.py accuracy --model fmnist_deit_p4 --limit 10000 --json tr.json [--png tr.png]
    python benchmarks/token_reduction.py speed --model deit_small_patch16_224 --batch 1 64 [--json speed.json]
    python benchmarks/token_reduction.py speed --batch 1 --compile --methods tome ats-topk-fused-r6
    python benchmarks/token_reduction.py summary tr.json    # the accuracy table again, from the JSON

``accuracy`` (a zoo model on the first ``--limit`` Fashion-MNIST test images) writes a JSON list of rows
``{"method", "setting", "gmacs", "dense_gmacs", "top1"}`` (GMACs per image, FlopCounterMode, mean over the first
``--gmacs-images``; top-1 in percent) and a PNG of top-1 against GMACs with each point's setting written beside it.
It also prints, for GMACs ratios from 0.45 to 0.8, the best ATS mode against ToMe interpolated over r at that ratio.
That best mode is picked on the scored images themselves, which favours ATS (many settings against ToMe's one knob),
so the table also gives ATS's margin with the setting picked elsewhere: on one half of the test images and reported
on the other, both ways (rows carry ``top1_halves``, the top-1 on the even and the odd images), and with
``--val-split holdout`` on validation images the model never trained on (rows carry ``val_top1``; the 12-block zoo
models hold out 5,000 training images).

Methods (ATS: Fayyaz et al., ECCV 2022; ToMe: Bolya et al., ICLR 2023; options in :mod:`ravit.ats.config`):

- ``dense``; ``tome``: ``ravit.apply_tome(model, r)``, setting r;
- ``ats``: the paper's algorithm (inverse transform sampling, the budget at every ATS block), setting the budget;
- ``ats-topk``: the paper's Top-K baseline, same budgets;
- ``ats-linear``: inverse transform, ``schedule="linear"`` (setting "first-last:K": ATS blocks, tokens left at the end);
- ``ats-fused`` / ``ats-topk-fused``: ``schedule="linear"`` and ``fuse="nearest"``, for three placements of the
  first ATS block (one before the paper's, the paper's, one after); ``ats-topk-fused`` also from block 0 with a
  light first cut (explicit per-block budgets, setting "0-last:K0/K1/...");
- ``ats-fused-p0.5`` / ``-p0.25`` / ``-p0.1``: ``ats-fused`` with that ``score_power`` (inverse transform on
  score^p: a flatter CDF, more distinct tokens per sample, so the same K costs more GMACs); these also start two
  blocks before the paper's first ATS block, where a flat CDF still leaves enough tokens.
- ``ats-topk-fused-r6``: ``ats-topk-fused`` with ``redundancy=6`` (a token's score times (1 - its largest key
  similarity to a more important token)^6: near-duplicates of kept tokens go first and merge into them), from
  blocks 0, 1 and one before the paper's first ATS block to the last block, and from block 0 to one or two blocks
  before it (``"0-10:K"`` on 12 blocks: the last block keeps K tokens; ``"0-9:K"``: the last two), to K in the same
  finals plus 1;
  ``ats-topk-fused-r6-alt``: the same on every other block (``"1-11/2:K"``: blocks 1, 3, ..., 11), half the ATS
  blocks' fixed cost at batch 1 for larger cuts per block;
  ``ats-topk-fused-r6-pair``: the same on block 1 and then every other block from 2 (``"1-2,4-10/2:K"`` on 12
  blocks: 1, 2, 4, 6, 8, 10): ``"0-10/2"`` with its first ATS block moved from block 0 to block 1, the same six
  cuts (ahead of ToMe at 0.50x on the 12-block zoo ViT, where the every-other-block mode is behind).

``speed`` times dense and, for each method, the setting whose GMACs ratio is nearest each ``--targets`` value
(found on ``--probe`` images), interleaved call by call on the same batch (with ``--tome-src DIR``, a clone of
facebookresearch/ToMe, also the released ToMe at the same r as ravit's, ``tome-released``), and prints images/s,
the speed-up, the GMACs ratio and the speed-up over the GMACs gain; at batch 1 also each ATS setting's share of its
zero-overhead ceiling (``benchmarks/ats_speed.py``: the same per-block token counts as free prefix slices, no
selection). ``--compile`` times every model (dense and ceilings included) under ``torch.compile``; ``--methods``
times a subset.
ATS runs as ``static=True`` where the mode allows (fixed shapes, one batched attention call); ``ats`` and
``ats-linear`` (inverse transform, adaptive counts) run on their ragged path.
A zoo name runs on Fashion-MNIST test images, any other timm name on random weights and images.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import ravit
from ravit.ats import apply_ats, trace
from ravit.bench.flops import count_gmacs
from ravit.cli._args import resolve_device
from ravit.data.datasets import create_dataset
from ravit.data.model_input import ModelInput
from ravit.errors import InvalidArgumentError
from ravit.models.zoo import list_zoo, load_manifest
from ravit.outputs import write_bytes, write_json
from ravit.tome import apply_tome, max_merges

sys.path.insert(0, str(Path(__file__).parent))
from ats_speed import ceiling_forward, timed  # noqa: E402  (the zero-overhead ceiling of benchmarks/ats_speed.py)


@dataclass(frozen=True)
class Method:
    """One point of a curve: how to reduce the model, and the label of the setting."""

    method: str
    setting: str | int | float
    apply: Callable[[torch.nn.Module], torch.nn.Module]


# score_power values of the flattened inverse-transform families (1 is the paper's, in ``ats-fused``)
POWERS = (0.5, 0.25, 0.1)
# redundancy of the redundancy-discounted fused Top-K family (0, off, is in ``ats-topk-fused``); 3 and 6 measured
# within noise of each other on the 12-block zoo models (1000 test images), 6 ahead at 0.5x GMACs on the ViT
REDUNDANCY = 6.0


def first_ats_block(depth: int) -> int:
    """The paper's first ATS block scaled to the depth: block 3 of DeiT-S's 12 (ATS Sec. 4), block 1 of 4."""
    return max(1, round(depth / 4))


def methods(model: torch.nn.Module) -> Iterator[Method]:
    """Every valid setting of every method for ``model`` (a timm ViT with a class token): settings the model refuses
    (a compounding ratio that leaves no token on a deep model) are left out."""
    for m in _all_methods(model):
        try:  # a shallow copy: applying only swaps the top module's class and sets its config
            m.apply(copy.copy(model))
        except InvalidArgumentError:
            continue
        yield m


def _all_methods(model: torch.nn.Module) -> Iterator[Method]:
    depth, n = len(model.blocks), model.patch_embed.num_patches
    first = first_ats_block(depth)
    paper = range(first, depth)
    yield Method("dense", "-", lambda m: m)
    # r up to 2N / depth: beyond it every later block is clamped and the GMACs ratio is far below the range of interest
    r_max = min(max_merges(n + model.num_prefix_tokens, model.num_prefix_tokens), 2 * n // depth)
    for r in range(1, r_max + 1):
        yield Method("tome", r, lambda m, r=r: apply_tome(m, r))
    for budget in (None, 0.9, 0.75, 0.6, 0.5, 0.35):
        yield Method("ats", "all" if budget is None else budget,
                     lambda m, b=budget: apply_ats(m, blocks=paper, budget=b))
        if budget is not None:
            yield Method("ats-topk", budget, lambda m, b=budget: apply_ats(m, blocks=paper, budget=b, sampler="topk"))
    finals = sorted({max(1, round(n * f)) for f in (0.8, 0.6, 0.4, 0.25, 0.12, 0.04)}, reverse=True)
    for k in finals:
        yield Method("ats-linear", f"{first}-{depth - 1}:{k}",
                     lambda m, k=k: apply_ats(m, blocks=paper, budget=k, schedule="linear"))
    # From block 0 a light first cut pays (block 0's class attention says little about the image yet): the first
    # ATS block drops d0 tokens, the others fall linearly to K (explicit per-block budgets, schedule "each").
    for d0 in (5, 7, 9, 11):
        for k in (1, 4):
            steps = [round(n - d0 - (n - d0 - k) * j / (depth - 1)) for j in range(depth)]
            yield Method("ats-topk-fused", f"0-{depth - 1}:{'/'.join(map(str, steps))}", lambda m, b=steps: apply_ats(
                m, blocks=range(depth), budget=b, sampler="topk", fuse="nearest", static=True))
    for start in sorted({max(0, first - 1), first, min(depth - 1, first + 1)}):
        for k in finals:
            for sampler, name in (("inverse_transform", "ats-fused"), ("topk", "ats-topk-fused")):
                yield Method(name, f"{start}-{depth - 1}:{k}", lambda m, s=start, k=k, sp=sampler: apply_ats(
                    m, blocks=range(s, depth), budget=k, sampler=sp, schedule="linear", fuse="nearest",
                    static=sp == "topk"))
    for power in POWERS:
        for start in sorted({max(0, first - 2), max(0, first - 1), first}):
            for k in finals:
                yield Method(f"ats-fused-p{power}", f"{start}-{depth - 1}:{k}", lambda m, s=start, k=k, p=power:
                             apply_ats(m, blocks=range(s, depth), budget=k, schedule="linear", fuse="nearest",
                                       score_power=p))
    # ending one or two blocks early (the last blocks then run on K tokens) reaches below 0.45x on 12 blocks, where
    # ToMe's r = 5 is; without (0, depth - 3) the family's cheapest setting on the 12-block ViT was 0.455x. Starting
    # at the paper's first ATS block and K = half the tokens fill the 0.7-0.85x range, which the others crossed in
    # one step (2-11:20 at 0.74x, 2-11:29 at 0.82x on the 12-block ViT)
    placements = sorted({(0, depth - 1), (min(1, depth - 1), depth - 1), (max(0, first - 1), depth - 1),
                         (first, depth - 1), (0, max(0, depth - 2)), (0, max(0, depth - 3))})
    # K = 0.7 N fills the light-cut gap between 0.6 N and 0.8 N (0.77-0.89x for the pair placement on the 12-block
    # ViT), where ToMe has only r = 1 and 2
    light = sorted({*finals, round(n / 2), round(0.7 * n), 1}, reverse=True)
    for start, end in placements:
        for k in light:
            yield Method(f"ats-topk-fused-r{REDUNDANCY:g}", f"{start}-{end}:{k}",
                         _redundancy_mode(range(start, end + 1), k))
    # every other block: half the ATS blocks, so half their fixed per-block cost at batch 1, each cutting twice as much
    for start in range(min(2, depth)):
        blocks = range(start, depth, 2)
        for k in sorted({*finals, 1}, reverse=True):
            yield Method(f"ats-topk-fused-r{REDUNDANCY:g}-alt", f"{start}-{blocks[-1]}/2:{k}",
                         _redundancy_mode(blocks, k))
    # block 1, then every other block from 2 ("0-10/2" with its first ATS block moved to block 1): found in a search
    # over seven placements of six to eight ATS blocks on the 12-block zoo ViT (README)
    pair = [1, *range(2, depth, 2)]
    if depth > 2:
        placement = f"1-2,4-{pair[-1]}/2" if len(pair) > 2 else "1-2"
        for k in light:
            yield Method(f"ats-topk-fused-r{REDUNDANCY:g}-pair", f"{placement}:{k}", _redundancy_mode(pair, k))


def _redundancy_mode(blocks: Sequence[int], k: int) -> Callable[[torch.nn.Module], torch.nn.Module]:
    """Applies static fused Top-K with ``redundancy=REDUNDANCY`` on ``blocks``, linearly to ``k`` patch tokens."""
    return lambda m: apply_ats(m, blocks=blocks, budget=k, sampler="topk", schedule="linear", fuse="nearest",
                               static=True, redundancy=REDUNDANCY)


def _zoo_or_timm(name: str) -> tuple[torch.nn.Module, bool]:
    zoo = name in list_zoo()
    torch.manual_seed(0)
    return ravit.create_model(name, pretrained=zoo).eval(), zoo


def _test_images(model: torch.nn.Module, limit: int, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` Fashion-MNIST images of ``split``, normalised for ``model``, and their labels."""
    spec = ModelInput.from_model(model)
    dataset = create_dataset("fashion_mnist", split, transform=spec.transform())
    n = min(limit, len(dataset))
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    return torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def _gmacs(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean GMACs per image over ``images``: each image alone for ATS (its kept tokens are its own)."""
    if ravit.ats.has_ats(model):
        return float(trace(model, images).gmacs.mean())
    return count_gmacs(model, images[:1])


@torch.no_grad()
def _hits(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int, device: torch.device,
          amp: bool) -> torch.Tensor:
    """(N,) bool: which ``images`` (on the CPU) ``model`` (on ``device``) classifies right, ``batch`` per call."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        return torch.cat([model(x.to(device)).argmax(-1).cpu().eq(y)
                          for x, y in zip(images.split(batch), labels.split(batch), strict=True)])


def _percent(hits: torch.Tensor) -> float:
    return 100.0 * int(hits.sum()) / hits.numel()


Key = Callable[[dict], float]


def _top1(row: dict) -> float:
    return row["top1"]


def _half(k: int) -> Key:
    """Top-1 on the even (k = 0) or odd (k = 1) test images of a row."""
    return lambda row: row["top1_halves"][k]


def interpolate(rows: list[dict], method: str, ratio: float, key: Key = _top1) -> float | None:
    """``method``'s ``key`` (top-1) at GMACs ``ratio``, linear between its two nearest points; None outside its
    range."""
    pts = sorted((r["gmacs"] / r["dense_gmacs"], key(r)) for r in rows if r["method"] == method)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= ratio <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (ratio - x0) / (x1 - x0)
    return None


def _mix(key: Key, row0: dict, row1: dict, t: float) -> float:
    """``key`` of the mix running a fraction ``t`` of the images with ``row1``'s setting, the rest with ``row0``'s."""
    return key(row0) + (key(row1) - key(row0)) * t


def envelope(rows: list[dict], ratio: float, select: Key = _top1, report: Key = _top1) -> tuple[float | None, str]:
    """The best ATS top-1 reachable at GMACs ``ratio``: the upper envelope of every ATS point, linear between two
    points (choosing between two settings per image batch gives any mix of their costs and accuracies).

    The mix is the one with the highest ``select`` accuracy at ``ratio``; its ``report`` accuracy is returned. Both
    are the test top-1 by default: the best setting is then picked on the images it is scored on, which favours
    ATS (many settings) over ToMe (one knob). Selecting on other images (a validation split, or one half of the
    test images to report the other) removes that bias; see :func:`held_out_margins`."""
    pts = sorted((r["gmacs"] / r["dense_gmacs"], i) for i, r in enumerate(rows) if r["method"].startswith("ats"))
    best, chosen, label = None, None, ""
    for i, (x0, i0) in enumerate(pts):
        for x1, i1 in pts[i:]:
            if x0 <= ratio <= x1:
                t = 0.0 if x1 == x0 else (ratio - x0) / (x1 - x0)
                y = _mix(select, rows[i0], rows[i1], t)
                if best is None or y > best:
                    name0, name1 = (f"{rows[j]['method']} {rows[j]['setting']}" for j in (i0, i1))
                    label = name0 if t == 0.0 else name1 if t == 1.0 else f"{name0} / {name1}"  # a point or a mix
                    best, chosen = y, _mix(report, rows[i0], rows[i1], t)
    return chosen, label


def held_out_margins(rows: list[dict], ratio: float) -> dict[str, float | None]:
    """Best ATS minus ToMe at GMACs ``ratio`` (points of top-1) with the ATS setting chosen on images it is not
    scored on: ``"val"`` picks on the validation split (rows' ``val_top1``, when measured) and reports the test
    top-1; ``"halves"`` picks on the even test images and reports the odd ones, and the reverse, and averages the
    two (two-fold cross-fitting). None where a curve does not reach ``ratio`` or the accuracies were not measured."""
    margins: dict[str, float | None] = {"val": None, "halves": None}
    tome = interpolate(rows, "tome", ratio)
    if tome is not None and all("val_top1" in r for r in rows):
        ats = envelope(rows, ratio, select=lambda r: r["val_top1"])[0]
        margins["val"] = None if ats is None else ats - tome
    if all("top1_halves" in r for r in rows):
        folds = []
        for k in (0, 1):
            tome_k = interpolate(rows, "tome", ratio, key=_half(1 - k))
            ats_k = envelope(rows, ratio, select=_half(k), report=_half(1 - k))[0]
            folds.append(None if tome_k is None or ats_k is None else ats_k - tome_k)
        margins["halves"] = None if None in folds else statistics.mean(folds)
    return margins


def _placement(setting: str | int | float) -> str:
    """The curve a setting belongs to: its ATS blocks ("1-3" of "1-3:12"), and whether its budgets are explicit."""
    text = str(setting)
    if ":" not in text:
        return ""
    blocks, budget = text.split(":")
    return f"{blocks}, light first cut" if "/" in budget else blocks


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the whole curves, and the target range zoomed in (where the methods differ by tenths of a point)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(16, 6), gridspec_kw=dict(width_ratios=(3, 2)))
    # the cycle's colours for the reduction methods; dense and ToMe are drawn in black (a star, a thick line)
    reducing = dict.fromkeys(r["method"] for r in rows if r["method"] not in ("dense", "tome"))
    colors = dict(zip(reducing, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 2, strict=False))
    # one line per method and placement ("1-3" of the setting "1-3:12"), so a curve never jumps between placements
    groups = dict.fromkeys((r["method"], _placement(r["setting"])) for r in rows)
    styles = ("-", "--", ":")
    for method, placement in groups:
        pts = sorted((r["gmacs"] / r["dense_gmacs"], r["top1"], r["setting"]) for r in rows if r["method"] == method
                     and _placement(r["setting"]) == placement)
        xs, ys, labels = zip(*pts, strict=True)
        rank = [p for m, p in groups if m == method].index(placement)
        style = dict(color=colors.get(method, "black"), marker="o", linestyle=styles[rank % len(styles)])
        if method == "dense":
            style.update(marker="*", markersize=12, linestyle="none")
        if method == "tome":
            style.update(linewidth=2)
        name = f"{method} (blocks {placement})" if placement else method
        for axes in (ax, zoom):
            axes.plot(xs, ys, label=name if axes is ax else None, **style)
            for x, y, label in zip(xs, ys, labels, strict=True):
                text = str(label).split(":")[-1].split("/")[0] if placement else str(label)
                axes.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    ax.axvspan(0.45, 0.8, color="0.93", zorder=0, label="target range")
    for axes in (ax, zoom):
        axes.set_xlabel("GMACs / dense GMACs")
        axes.set_ylabel("top-1 (%)")
        axes.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    zoom.set_title("the target range, zoomed", fontsize=10)
    fig.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.01), ncol=4)  # below the axes, off the points
    dense = next(r["top1"] for r in rows if r["method"] == "dense")
    ax.set_ylim(max(0.0, dense - 25), dense + 2)
    window = [r["top1"] for r in rows if 0.43 <= r["gmacs"] / r["dense_gmacs"] <= 0.82]
    zoom.set_xlim(0.43, 0.82)
    if window:
        zoom.set_ylim(min(window) - 0.2, max(window) + 0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def _fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}"


def _val_split(name: str, split: str | None) -> str | None:
    """``split`` if the zoo model ``name`` never trained on it (else a clear error): selecting settings there is
    selecting on unseen images."""
    if split is None:
        return None
    trained_on = load_manifest()["models"][name]["train_config"]["train_split"]
    if split == "test" or trained_on == "train" or split == trained_on:
        raise InvalidArgumentError(f"--val-split {split}: {name} trained on {trained_on!r}, which holds those images "
                                   f"(or it is the test split); a validation split must be unseen and not the test "
                                   f"images (the 12-block zoo models hold out 'holdout')")
    return split


def accuracy(args: argparse.Namespace) -> None:
    model, zoo = _zoo_or_timm(args.model)
    if not zoo:
        raise InvalidArgumentError(f"accuracy needs a zoo model with its test data ({', '.join(list_zoo())}); "
                                   f"{args.model!r} is not one (speed takes any timm ViT)")
    val_split = _val_split(args.model, args.val_split)
    images, labels = _test_images(model, args.limit)
    val = _test_images(model, args.val_limit, val_split) if val_split else None
    dense_gmacs = count_gmacs(model, images[:1])
    device = args.device
    rows = []
    chosen = _only(list(methods(model)), args.methods)
    for m in tqdm(chosen, desc=f"{args.model} · accuracy", disable=not args.progress):
        reduced = m.apply(copy.deepcopy(model))
        gmacs = _gmacs(reduced, images[: args.gmacs_images])  # counted on the CPU: the same ops run on any device
        hits = _hits(reduced.to(device), images, labels, args.batch, device, args.amp)  # (N,)
        row = dict(method=m.method, setting=m.setting, gmacs=gmacs, dense_gmacs=dense_gmacs, top1=_percent(hits),
                   top1_halves=[_percent(hits[0::2]), _percent(hits[1::2])])
        if val is not None:
            row["val_top1"] = _percent(_hits(reduced, *val, args.batch, device, args.amp))
        rows.append(row)
    write_json(args.json, rows)
    png = Path(args.png) if args.png else Path(args.json).with_suffix(".png")
    where = "" if device.type == "cpu" and not args.amp else f" ({device.type}{', bf16 autocast' if args.amp else ''})"
    plot(rows, png, f"{args.model}: top-1 vs GMACs, first {len(labels)} Fashion-MNIST test images{where}")
    print(f"{args.model}: dense {rows[0]['top1']:.2f}% at {dense_gmacs:.4f} GMACs ({len(labels)} test images"
          f"{f', settings also scored on {len(val[1])} {val_split} images' if val else ''})")
    print_summary(rows)
    print(f"wrote {args.json} and {png}")


def _fmt_margin(value: float | None) -> str:
    return "    n/a" if value is None else f"{value:+7.2f}"


def print_summary(rows: list[dict]) -> None:
    """ToMe and the best ATS mode at GMACs ratios 0.45-0.8, with the best mode picked on the test images themselves,
    then (where the rows have them) the margin over ToMe with the mode picked on other images."""
    print(f"{'ratio':>6} {'ToMe':>7} {'best ATS':>9} {'val-picked':>10} {'half-picked':>11}  mode (picked on test)")
    for ratio in np.arange(0.45, 0.801, 0.05):
        tome, (ats, label) = interpolate(rows, "tome", ratio), envelope(rows, ratio)
        verdict = "" if tome is None or ats is None else ("  >= ToMe" if ats >= tome else "  < ToMe")
        held = held_out_margins(rows, ratio)
        print(f"{ratio:6.2f} {_fmt(tome):>7} {_fmt(ats):>9} {_fmt_margin(held['val']):>10} "
              f"{_fmt_margin(held['halves']):>11}  {label}{verdict}")
    print("val-picked / half-picked: best ATS minus ToMe (points) with the ATS setting chosen on the validation "
          "split / on one half of the test images (reported on the other half, both ways, averaged)")


def summary(args: argparse.Namespace) -> None:
    """The table of ``accuracy`` again, from its JSON."""
    try:
        rows = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as err:
        raise InvalidArgumentError(f"{args.json}: not a readable accuracy JSON ({err})") from err
    needed = {"method", "setting", "gmacs", "dense_gmacs", "top1"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and needed <= r.keys() for r in rows):
        raise InvalidArgumentError(f"{args.json}: not an accuracy JSON (a list of rows with {sorted(needed)}; "
                                   f"write one with the accuracy command)")
    print_summary(rows)


def _only(candidates: list[Method], names: list[str] | None) -> list[Method]:
    """Dense and the settings of the methods ``names`` (None: every method); an unknown name is refused."""
    known = {m.method for m in candidates} - {"dense"}
    if names is not None and not set(names) <= known:
        raise InvalidArgumentError(f"--methods: unknown {sorted(set(names) - known)}; choose from {sorted(known)}")
    return [m for m in candidates if names is None or m.method in (*names, "dense")]


def _nearest(model: torch.nn.Module, probe: torch.Tensor, targets: list[float], candidates: list[Method]
             ) -> list[tuple[float, Method, float]]:
    """For each method among ``candidates`` and target ratio, the setting whose GMACs ratio on ``probe`` is
    nearest."""
    dense = count_gmacs(model, probe[:1])
    ratios: dict[str, list[tuple[float, Method]]] = {}
    for m in candidates:
        if m.method != "dense":
            ratios.setdefault(m.method, []).append((_gmacs(m.apply(copy.deepcopy(model)), probe) / dense, m))
    return [(t, *min(points, key=lambda p: abs(p[0] - t))[::-1]) for t in targets for points in ratios.values()]


def released_tome(src: str) -> Callable[[torch.nn.Module, int], torch.nn.Module]:
    """``apply(model, r)`` of the released ToMe (facebookresearch/ToMe's ``tome.patch.timm``), imported from the
    folder ``src`` the user gives (never part of this repository). A plain-Python patch of the timm model in the
    user's own process is how the release is used, so it is timed that way, interleaved with the other methods."""
    folder = Path(src).expanduser()
    if not (folder / "tome" / "patch").is_dir():
        raise InvalidArgumentError(f"--tome-src {src}: no tome/patch/ package there (a clone of facebookresearch/ToMe)")
    sys.path.insert(0, str(folder))
    import tome

    def apply(model: torch.nn.Module, r: int) -> torch.nn.Module:
        tome.patch.timm(model)
        model.r = r
        return model
    return apply


def speed(args: argparse.Namespace) -> None:
    model, zoo = _zoo_or_timm(args.model)
    size = ModelInput.from_model(model)
    shape = (size.in_chans, *size.size)
    gen = torch.Generator().manual_seed(0)
    probe = _test_images(model, args.probe)[0] if zoo else torch.randn(args.probe, *shape, generator=gen)
    chosen = _nearest(model, probe, args.targets, _only(list(methods(model)), args.methods))
    if args.tome_src:  # the released ToMe at the r of ravit's (same merges, so the same GMACs), timed beside it
        apply = released_tome(args.tome_src)
        chosen += [(t, Method("tome-released", m.setting, lambda net, r=m.setting: apply(net, r)), ratio)
                   for t, m, ratio in chosen if m.method == "tome"]
        chosen.sort(key=lambda c: -c[0])
    device = args.device
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{torch.get_num_threads()} threads")
    print(f"{args.model}, torch {torch.__version__}, {where}, {'bf16 autocast' if args.amp else 'fp32'}; "
          f"{args.runs} interleaved timed calls per method after one warm-up, medians"
          + ("; every model torch.compile'd" if args.compile else ""))
    results = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
        for batch in args.batch:
            model.cpu()  # the reduced copies and the ceilings' token counts are made on the CPU, then moved
            images = (_test_images(model, batch)[0] if zoo else torch.randn(batch, *shape, generator=gen))
            models = {("dense", "-"): model}
            for _, m, _ in chosen:
                models.setdefault((m.method, m.setting), m.apply(copy.deepcopy(model)))
            if batch == 1:  # each ATS setting's zero-overhead ceiling: its token counts as free prefix slices
                for (method, setting), reduced in list(models.items()):
                    if method.startswith("ats"):
                        counts = trace(reduced, images, count_gmacs=False).kept_tokens[0].tolist()
                        kept = dict(zip(reduced.ats_config.blocks, counts, strict=True))
                        models[("ceiling " + method, setting)] = ceiling_forward(model, kept)
            images = images.to(device)
            # in place: the dense model (whose modules the ceilings' forwards call) is one of them
            models = {key: mod.to(device) if isinstance(mod, torch.nn.Module) else mod for key, mod in models.items()}
            if args.compile:  # inductor; each model compiles in the untimed warm-up round
                models = {key: torch.compile(mod) for key, mod in models.items()}
            times = {key: [] for key in models}
            for i in range(args.runs + 1):
                for key, mod in models.items():
                    elapsed = timed(mod, images)
                    if i:
                        times[key].append(elapsed)
            median = {key: batch / statistics.median(t) for key, t in times.items()}  # images per second
            dense = median[("dense", "-")]
            print(f"\nbatch {batch}: dense {dense:.1f} img/s")
            print(f"{'target':>6} {'method':>15} {'setting':>10} {'GMACs ratio':>11} {'img/s':>9} {'speed-up':>8} "
                  f"{'of GMACs gain':>13}" + (f" {'of ceiling':>10}" if batch == 1 else ""))
            for target, m, ratio in chosen:
                ips = median[(m.method, m.setting)]
                row = dict(batch=batch, target=target, method=m.method, setting=m.setting, gmacs_ratio=ratio,
                           img_s=ips, dense_img_s=dense, speedup=ips / dense, of_gmacs_gain=ips / dense * ratio)
                ceiling = median.get(("ceiling " + m.method, m.setting))
                if ceiling is not None:
                    row.update(ceiling_img_s=ceiling, of_ceiling=ips / ceiling)
                results.append(row)
                print(f"{target:6.2f} {m.method:>15} {m.setting!s:>10} {ratio:11.3f} {ips:9.1f} {ips / dense:8.2f} "
                      f"{ips / dense * ratio:13.2f}" + (f" {ips / ceiling:10.2f}" if ceiling else ""))
    if args.json:
        write_json(args.json, dict(model=args.model, torch=torch.__version__, threads=torch.get_num_threads(),
                                   device=where, amp=args.amp, runs=args.runs, compiled=args.compile,
                                   results=results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="top-1 vs GMACs of every method (JSON + PNG)")
    acc.add_argument("--model", default="fmnist_deit_p4")
    acc.add_argument("--limit", type=int, default=1000, help="first N Fashion-MNIST test images")
    acc.add_argument("--gmacs-images", type=int, default=64, help="images whose GMACs are counted, per setting")
    acc.add_argument("--batch", type=int, default=250)
    acc.add_argument("--json", required=True)
    acc.add_argument("--png", default=None, help="default: the JSON path with .png")
    acc.add_argument("--val-split", default=None,
                     help="also score every setting on this Fashion-MNIST split (one the model never trained on, "
                     "e.g. 'holdout' for the 12-block zoo models) and report the ATS mode picked there")
    acc.add_argument("--val-limit", type=int, default=5000, help="first N images of --val-split")
    summ = sub.add_parser("summary", help="the accuracy table again from an accuracy JSON")
    summ.add_argument("json")
    spd = sub.add_parser("speed", help="images/s of every method at matched GMACs, interleaved")
    spd.add_argument("--model", default="deit_small_patch16_224")
    spd.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    spd.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.65, 0.5], help="GMACs ratios to match")
    spd.add_argument("--probe", type=int, default=4, help="images on which settings are matched to the targets")
    spd.add_argument("--runs", type=int, default=5)
    spd.add_argument("--json", default=None)
    acc.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                     help="measure only these methods beside dense (default: all)")
    spd.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                     help="time only these methods beside dense (default: all); tome also brings tome-released")
    spd.add_argument("--compile", action="store_true",
                     help="time every model (dense, the ceilings, each method) under torch.compile (inductor): at "
                     "batch 1 this removes the per-op dispatch that dominates the eager ATS blocks; static ATS and "
                     "ToMe compile without graph breaks")
    spd.add_argument("--tome-src", default=None,
                     help="a clone of facebookresearch/ToMe: also time the released ToMe at ravit ToMe's r")
    for p in (acc, spd):
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--device", default="cpu", help="where the models run (GMACs are counted on the CPU)")
        p.add_argument("--amp", action="store_true", help="bf16 autocast on --device")
    args = parser.parse_args(argv)
    try:
        if args.command == "summary":  # reads a JSON: no models, threads or device
            return summary(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        args.device = resolve_device(args.device)  # a clear error before any work
        accuracy(args) if args.command == "accuracy" else speed(args)
    except InvalidArgumentError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
