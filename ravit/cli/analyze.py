"""``ravit analyze``: token grouping (FAN paper Sec. 3), attention maps and ATS token masks, as figures and numbers.

Analyses (each writes ``<output>/<analysis>.png`` plus ``.json``, and ``.csv`` where tabular; ``--output`` defaults to
``runs/analyze/<MODEL>``):

  spectra       significant eigenvalues of each block's token affinity, averaged over a dataset
  perturbation  relative change of each block's output under Gaussian input noise, over a dataset
  clusters      k-way spectral clustering of block tokens, as masks over a few images
  attention     CLS / class-attention and token-mixing attention maps over a few images
  ats           ATS kept-token masks per block, kept-token histograms and per-image GMACs

MODEL is any ravit or timm model name (zoo models with ``--pretrained``), ``--checkpoint`` loads a file. Images of any
size are brought to the model as ``ravit.data.ModelInput`` says: converted to the model's channels, resized (and
centre-cropped by crop_pct) to the model's input size, normalised with the dataset's statistics as ``ravit train`` does
(with ``--pretrained``, or on an image folder: those of the weights' pretrained config).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ravit.cli._args import (
    add_count_argument,
    add_data_arguments,
    add_device_argument,
    add_list_argument,
    add_model_arguments,
    add_output_argument,
    block_indices,
    budget,
    build_model,
    model_input,
    noise_std,
    output_dir,
    resolve_device,
)
from ravit.errors import InvalidArgumentError

__all__ = ["register", "run"]

_DESCRIPTIONS = {
    "spectra": "number of significant eigenvalues of each block's token affinity (ours; see ravit.analysis.spectra)",
    "perturbation": "relative perturbation ||f(x+d)-f(x)||/||f(x)|| of each block's output for Gaussian noise d",
    "clusters": "k-way spectral clustering of a block's tokens as masks over images (k=2 as the FAN authors)",
    "attention": "attention maps over images: CLS / class attention and token-mixing attention",
    "ats": "ATS: kept-token masks per ATS block, histogram of kept tokens, per-image GMACs",
}


def _add_common(parser: argparse.ArgumentParser, limit: int, dataset_level: bool) -> None:
    add_model_arguments(parser)
    add_data_arguments(parser)
    add_count_argument(parser, "--limit", limit, "images analysed: the first N of the split" if dataset_level
                       else "images shown: the first N of the split, unless --indices")
    if not dataset_level:
        add_list_argument(parser, "--indices", int, "dataset indices of the images to show (instead of --limit)",
                          metavar="INDEX")
    add_count_argument(parser, "--batch-size", 32, "images per batch")
    add_count_argument(parser, "--workers", 0, "data loader workers", least=0)
    add_device_argument(parser)
    add_output_argument(parser, "analyze")
    parser.add_argument("--seed", type=int, default=0, help="seeds model initialisation and noise")


def _add_block_arguments(p: argparse.ArgumentParser, default: str) -> None:
    add_list_argument(p, "--blocks", block_indices, f"block indices and ranges, e.g. 0,2 or 0-3 (default: {default})",
                      metavar="BLOCK")


def _add_spectra(p: argparse.ArgumentParser) -> None:
    _add_block_arguments(p, "all")
    add_list_argument(p, "--layers", str, "module names to hook instead of blocks.{i} (e.g. layer1 layer2)",
                      metavar="NAME")
    p.add_argument("--affinity", choices=["gaussian", "cosine"], default="gaussian", help="token affinity kernel")
    p.add_argument("--bandwidth", type=float, default=0.1, help="Gaussian kernel bandwidth on unit-norm tokens")
    p.add_argument("--threshold", type=float, default=0.5, help="significant: eigenvalue >= threshold * largest")


def _add_perturbation(p: argparse.ArgumentParser) -> None:
    _add_block_arguments(p, "all")
    add_list_argument(p, "--layers", str, "module names to hook instead of blocks.{i} (e.g. layer1 layer2)",
                      metavar="NAME")
    add_list_argument(p, "--noise-std", noise_std, "std of the Gaussian noise in normalised input units (one curve "
                      "each)", default=[0.1, 0.5], metavar="STD")


def _add_clusters(p: argparse.ArgumentParser) -> None:
    _add_block_arguments(p, "4 spread out; one row each")
    add_count_argument(p, "--k", 2, "number of clusters")
    p.add_argument("--affinity", choices=["gaussian", "cosine"], default="gaussian", help="token affinity kernel")
    p.add_argument("--bandwidth", type=float, default=0.1, help="Gaussian kernel bandwidth on unit-norm tokens")


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["auto", "cls", "tokens"], default="auto",
                   help="cls: class-token / class-attention maps (needs a class token); tokens: attention among "
                        "patches; auto: both where available")
    p.add_argument("--block", type=int, default=-1, help="block index (-1: the last)")
    p.add_argument("--query", type=int, help="tokens: show this query patch's row instead of the mean received")


def _add_ats(p: argparse.ArgumentParser) -> None:
    add_list_argument(p, "--blocks", block_indices, "ATS blocks: indices and inclusive ranges, e.g. 1-3 (default: "
                      "apply_ats's, 3-11)", metavar="BLOCK")
    add_list_argument(p, "--budget", budget, "tokens per ATS block: none (all tokens, the released default), an int "
                      "count of patch tokens or a ratio in (0, 1]; one value or one per block (default: none)",
                      metavar="BUDGET")
    p.add_argument("--sampler", default="inverse_transform", choices=["inverse_transform", "topk"],
                   help="inverse_transform (the paper's) or topk (the ablation)")
    add_count_argument(p, "--mask-images", 6, "images shown in the kept-token masks figure")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="token grouping, attention maps and ATS masks (figures + JSON/CSV)", description=__doc__,
    )
    analyses = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    analyses.required = True
    table = {
        "spectra": (_add_spectra, _run_spectra, 256, True),
        "perturbation": (_add_perturbation, _run_perturbation, 256, True),
        "clusters": (_add_clusters, _run_clusters, 6, False),
        "attention": (_add_attention, _run_attention, 6, False),
        "ats": (_add_ats, _run_ats, 256, True),
    }
    for name, (add_arguments, func, limit, dataset_level) in table.items():
        sub = analyses.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name])
        _add_common(sub, limit, dataset_level)
        add_arguments(sub)
        sub.set_defaults(func=run, run_analysis=func)


def run(args) -> int:
    resolve_device(args.device)
    output_dir(args, "analyze", args.model)  # checked before a model is built or an image read
    return int(args.run_analysis(args) or 0)


# --- model and data -----------------------------------------------------------------------------------------------
def _load_model(args) -> torch.nn.Module:
    # Seeded: random-weight models (no --pretrained / --checkpoint) are reproducible.
    return build_model(args, seed=args.seed).to(resolve_device(args.device))


def _dataset(args, model: torch.nn.Module):
    from ravit.data import open_data

    return open_data(args.data, args.split, args.data_dir, model_input(model, args.data, args.pretrained).transform())


def _subset(dataset, indices: list[int]):
    from torch.utils.data import Subset

    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise InvalidArgumentError(f"image indices {bad} outside the dataset's {len(dataset)} images")
    return Subset(dataset, indices)


def _batches(args, model, desc: str):
    """Batches of the first --limit images on the device, with a progress bar."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    dataset = _dataset(args, model)
    subset = _subset(dataset, list(range(min(args.limit, len(dataset)))))
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    device = next(model.parameters()).device
    for images, _ in tqdm(loader, desc=desc, unit="batch"):
        yield images.to(device)


def _images(args, model, count: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(images (B, C, H, W) on the device, their dataset indices, their labels): --indices, else the first count."""
    dataset = _dataset(args, model)
    indices = getattr(args, "indices", None) or list(range(min(count, len(dataset))))
    items = [_subset(dataset, indices)[i] for i in range(len(indices))]
    images = torch.stack([image for image, _ in items]).to(next(model.parameters()).device)
    return images, indices, [int(label) for _, label in items]


def _output(args) -> Path:
    path = output_dir(args, "analyze", args.model)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _header(args, **extra) -> dict:
    return dict(
        analysis=args.analysis, model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
        model_kwargs=args.model_kwargs, data=args.data, split=args.split, **extra,
    )


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    std = float(values.std()) if values.numel() > 1 else 0.0
    return dict(mean=float(values.mean()), std=std, min=float(values.min()), max=float(values.max()))


def _short(name: str) -> str:
    return name.replace("blocks.", "") if name.startswith("blocks.") else name


def _done(paths) -> int:
    for path in paths:
        print(path)
    return 0


# --- analyses -------------------------------------------------------------------------------------------------------
def _run_spectra(args) -> int:
    from ravit.analysis import grouping_spectra, plot_block_curves, write_csv, write_json

    model = _load_model(args)
    counts = grouping_spectra(
        model, _batches(args, model, "spectra"), threshold=args.threshold, kind=args.affinity,
        bandwidth=args.bandwidth, indices=args.blocks, names=args.layers,
    )
    out = _output(args)
    names = list(counts)
    stats = {name: _summary(values) for name, values in counts.items()}
    settings = dict(affinity=args.affinity, bandwidth=args.bandwidth, threshold=args.threshold)
    record = _header(
        args, num_images=len(next(iter(counts.values()))), settings=settings,
        definition="ours: eigenvalues of D^-1/2 W D^-1/2 for the affinity W of L2-normalised patch tokens, counted "
                   "when >= threshold * the largest (ravit.analysis.spectra)",
        blocks=[dict(name=name, **stats[name]) for name in names],
        counts={name: values.tolist() for name, values in counts.items()},
    )
    paths = [
        write_json(out / "spectra.json", record),
        write_csv(out / "spectra.csv", ["block", "mean", "std", "min", "max"],
                  [[n, stats[n]["mean"], stats[n]["std"], stats[n]["min"], stats[n]["max"]] for n in names]),
        plot_block_curves(
            out / "spectra.png", {args.model: ([stats[n]["mean"] for n in names], [stats[n]["std"] for n in names])},
            [_short(n) for n in names], "significant eigenvalues (mean ± std)",
            f"Token grouping: {args.model} ({args.affinity}, bw {args.bandwidth}, thr {args.threshold})",
        ),
    ]
    return _done(paths)


def _run_perturbation(args) -> int:
    from ravit.analysis import perturbation_profile, plot_block_curves, write_csv, write_json

    model = _load_model(args)
    profiles = {}
    for std in args.noise_std:
        profiles[std] = perturbation_profile(
            model, _batches(args, model, f"noise {std:g}"), std, seed=args.seed, indices=args.blocks,
            names=args.layers,
        )
    out = _output(args)
    names = list(next(iter(profiles.values())))
    stats = {std: {n: _summary(v) for n, v in profile.items()} for std, profile in profiles.items()}
    record = _header(
        args, num_images=len(next(iter(profiles.values()))["input"]), seed=args.seed,
        definition="||f(x+d)-f(x)||_F / ||f(x)||_F over each block's patch tokens per image, d ~ N(0, std^2) in "
                   "normalised input units; 'input' is the same ratio for the input",
        noise=[dict(noise_std=std, blocks=[dict(name=n, **stats[std][n]) for n in names]) for std in profiles],
    )
    rows = [[std, n, stats[std][n]["mean"], stats[std][n]["std"]] for std in profiles for n in names]
    paths = [
        write_json(out / "perturbation.json", record),
        write_csv(out / "perturbation.csv", ["noise_std", "block", "mean", "std"], rows),
        plot_block_curves(
            out / "perturbation.png",
            {f"noise std {std:g}": ([stats[std][n]["mean"] for n in names], [stats[std][n]["std"] for n in names])
             for std in profiles},
            [_short(n) for n in names], "relative perturbation ||Δf|| / ||f||",
            f"Noise propagation: {args.model}", xlabel="layer (input, then blocks)",
        ),
    ]
    return _done(paths)


def _run_clusters(args) -> int:
    from ravit.analysis import (
        block_names,
        block_outputs,
        labels_to_mask,
        plot_image_maps,
        spectral_clustering,
        write_json,
    )

    model = _load_model(args)
    images, indices, labels = _images(args, model, args.limit)
    depth = len(block_names(model))
    blocks = args.blocks if args.blocks else sorted({round(i * (depth - 1) / 3) for i in range(4)})
    outputs = block_outputs(model, images, indices=blocks)
    maps, record_blocks = {}, []
    for name, tokens, grid in zip(outputs.names, outputs.tokens, outputs.grids, strict=True):
        if args.k > tokens.shape[1]:
            raise InvalidArgumentError(f"--k {args.k} exceeds the {tokens.shape[1]} tokens of {name}")
        token_labels = spectral_clustering(tokens, args.k, args.affinity, args.bandwidth)  # (B, N)
        maps[name] = labels_to_mask(token_labels, grid, (images.shape[-2], images.shape[-1]))
        record_blocks.append(dict(name=name, grid=list(grid), labels=labels_to_mask(token_labels, grid).tolist()))
    out = _output(args)
    record = _header(
        args, k=args.k, affinity=args.affinity, bandwidth=args.bandwidth, image_indices=indices, labels=labels,
        note="cluster 0 is the largest; ids carry no foreground/background meaning", blocks=record_blocks,
    )
    paths = [
        write_json(out / "clusters.json", record),
        plot_image_maps(
            out / "clusters.png", images.cpu(), maps, f"{args.k}-way spectral clustering of block tokens: "
            f"{args.model}", "cluster", num_classes=args.k, column_titles=[f"#{i}" for i in indices],
        ),
    ]
    return _done(paths)


def _run_attention(args) -> int:
    from ravit.analysis import cls_attention, model_has_cls_token, plot_image_maps, token_attention, write_json

    model = _load_model(args)
    images, indices, labels = _images(args, model, args.limit)
    from ravit.analysis import block_names

    maps: dict[str, torch.Tensor] = {}  # row label -> (B, heads, h, w)
    names = block_names(model)
    if not -len(names) <= args.block < len(names):
        raise InvalidArgumentError(f"--block {args.block} out of range for a model with {len(names)} blocks")
    block = names[args.block]
    has_class_attention = hasattr(model, "get_attention_maps")  # FAN: class-attention blocks after the blocks
    if args.kind == "cls" or (args.kind == "auto" and (has_class_attention or model_has_cls_token(model))):
        if has_class_attention:
            maps["class attention\n(last class-attn. block)"] = cls_attention(model, images)
        else:
            maps[f"CLS attention\n{block}"] = cls_attention(model, images, block=args.block)
    if args.kind in ("tokens", "auto"):
        what = "mean received" if args.query is None else f"row of patch {args.query}"
        maps[f"token attention\n{what}\n{block}"] = token_attention(model, images, args.block, args.query)
    out = _output(args)
    record = _header(
        args, kind=args.kind, block=block, query=args.query, image_indices=indices, labels=labels,
        maps=[dict(name=name.replace("\n", " "), grid=list(values.shape[-2:]), head_mean=values.mean(1).tolist(),
                   per_head=values.tolist()) for name, values in maps.items()],
    )
    size = (images.shape[-2], images.shape[-1])
    shown = {name: torch.nn.functional.interpolate(v.mean(1, keepdim=True), size=size, mode="nearest")[:, 0]
             for name, v in maps.items()}
    paths = [
        write_json(out / "attention.json", record),
        plot_image_maps(out / "attention.png", images.cpu(), shown, f"Attention maps (head mean): {args.model}",
                        "attention", column_titles=[f"#{i}" for i in indices]),
    ]
    return _done(paths)


def _run_ats(args) -> int:
    import ravit
    from ravit.analysis import (
        ats_statistics,
        ats_token_masks,
        kept_token_histogram,
        plot_histogram,
        plot_image_maps,
        plot_token_histogram,
        write_csv,
        write_json,
    )

    model = _load_model(args)
    kwargs = dict(sampler=args.sampler)
    if args.blocks:
        kwargs["blocks"] = args.blocks
    if args.budget is not None:
        kwargs["budget"] = args.budget[0] if len(args.budget) == 1 else args.budget
    ravit.apply_ats(model, **kwargs)
    stats = ats_statistics(model, _batches(args, model, "ats"))
    images, indices, labels = _images(args, model, args.mask_images)
    block_labels, masks = ats_token_masks(model, images)  # (S, B, h, w)
    histogram = kept_token_histogram(stats.kept_tokens, stats.max_tokens)
    out = _output(args)
    per_block = [dict(name=name, **_summary(stats.kept_tokens[:, j])) for j, name in enumerate(stats.blocks)]
    record = _header(
        args, ats=dict(kwargs, blocks=list(stats.blocks)), num_images=len(stats.gmacs), max_tokens=stats.max_tokens,
        kept_tokens=per_block, histogram=histogram.tolist(), gmacs=dict(**_summary(stats.gmacs),
                                                                        per_image=stats.gmacs.tolist()),
        masks=dict(image_indices=indices, labels=labels, blocks=block_labels, kept=masks.int().tolist()),
    )
    size = (images.shape[-2], images.shape[-1])
    mask_maps = {
        name: torch.nn.functional.interpolate(masks[j][:, None].float(), size=size, mode="nearest")[:, 0]
        for j, name in enumerate(block_labels)
    }
    paths = [
        write_json(out / "ats.json", record),
        write_csv(out / "ats.csv", ["block", "mean_kept", "std_kept", "min_kept", "max_kept"],
                  [[b["name"], b["mean"], b["std"], b["min"], b["max"]] for b in per_block]),
        plot_image_maps(out / "ats_masks.png", images.cpu(), mask_maps, f"ATS kept tokens per block: {args.model}",
                        "kept", num_classes=2, column_titles=[f"#{i}" for i in indices]),
        plot_token_histogram(out / "ats_tokens.png", histogram, stats.blocks,
                             f"Tokens kept per ATS block: {args.model} ({len(stats.gmacs)} images)"),
        plot_histogram(out / "ats_gmacs.png", stats.gmacs, "GMACs per image",
                       f"ATS cost per image: {args.model}"),
    ]
    return _done(paths)
