"""``ravit analyze``: token grouping (FAN paper Sec. 3), attention maps and ATS token masks, as figures and numbers.

Analyses (each writes ``<output>/<analysis>.png`` plus ``.json``, and ``.csv`` where tabular):

  spectra       significant eigenvalues of each block's token affinity, averaged over a dataset
  perturbation  relative change of each block's output under Gaussian input noise, over a dataset
  clusters      k-way spectral clustering of block tokens, as masks over a few images
  attention     CLS / class-attention and token-mixing attention maps over a few images
  ats           ATS kept-token masks per block, kept-token histograms and per-image GMACs

MODEL is any ravit or timm model name (zoo models with ``--pretrained``), ``--checkpoint`` loads a file. Images of any
size are brought to the model through the eval transform ``ravit train`` uses: converted to the model's channels,
resized (and centre-cropped by crop_pct) to the model's input size, normalised with the dataset's statistics (with
``--pretrained``: the mean, std and crop_pct of the weights' pretrained config).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ravit.cli import CLIError
from ravit.cli._args import add_weight_arguments, parse_model_kwargs, resolve_device
from ravit.errors import InvalidArgumentError, MissingFileError

__all__ = ["register", "run"]

_DESCRIPTIONS = {
    "spectra": "number of significant eigenvalues of each block's token affinity (ours; see ravit.analysis.spectra)",
    "perturbation": "relative perturbation ||f(x+d)-f(x)||/||f(x)|| of each block's output for Gaussian noise d",
    "clusters": "k-way spectral clustering of a block's tokens as masks over images (k=2 as the FAN authors)",
    "attention": "attention maps over images: CLS / class attention and token-mixing attention",
    "ats": "ATS: kept-token masks per ATS block, histogram of kept tokens, per-image GMACs",
}


def _add_common(parser: argparse.ArgumentParser, num_images: int, dataset_level: bool) -> None:
    parser.add_argument("model", metavar="MODEL", help="ravit / timm model name (e.g. fan_tiny_12_p16_224)")
    add_weight_arguments(parser)
    parser.add_argument("--dataset", default="fashion_mnist",
                        help="'fashion_mnist' (or 'fashion-mnist'), or an image folder: <folder>/<class>/<image> or "
                             "<folder>/<split>/<class>/<image>")
    parser.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: the Debian package's folder)")
    parser.add_argument("--split", default="test", help="dataset split")
    parser.add_argument("--num-images", type=int, default=num_images,
                        help="images analysed (the first N of the split)" if dataset_level
                        else "images shown (the first N of the split, unless --indices)")
    if not dataset_level:
        parser.add_argument("--indices", type=int, nargs="+", help="indices of the images to show (instead)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="data loader workers")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... ('auto': cuda when available)")
    parser.add_argument("--output", default=None, help="output folder (default: runs/analyze/<MODEL>)")
    parser.add_argument("--seed", type=int, default=0, help="seeds model initialisation and noise")


def _add_spectra(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, nargs="+", help="block indices (default: all)")
    p.add_argument("--layers", nargs="+", help="module names to hook instead of blocks.{i} (e.g. layer1 layer2)")
    p.add_argument("--affinity", choices=["gaussian", "cosine"], default="gaussian")
    p.add_argument("--bandwidth", type=float, default=0.1, help="Gaussian kernel bandwidth on unit-norm tokens")
    p.add_argument("--threshold", type=float, default=0.5, help="significant: eigenvalue >= threshold * largest")


def _add_perturbation(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, nargs="+", help="block indices (default: all)")
    p.add_argument("--layers", nargs="+", help="module names to hook instead of blocks.{i} (e.g. layer1 layer2)")
    p.add_argument("--noise-std", type=float, nargs="+", default=[0.1, 0.5],
                   help="std of the Gaussian noise in normalised input units (one curve each)")


def _add_clusters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--blocks", type=int, nargs="+", help="block indices, one row each (default: 4 spread out)")
    p.add_argument("--k", type=int, default=2, help="number of clusters")
    p.add_argument("--affinity", choices=["gaussian", "cosine"], default="gaussian")
    p.add_argument("--bandwidth", type=float, default=0.1)


def _add_attention(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["auto", "cls", "tokens"], default="auto",
                   help="cls: class-token / class-attention maps (needs a class token); tokens: attention among "
                        "patches; auto: both where available")
    p.add_argument("--block", type=int, default=-1, help="block index (default: the last)")
    p.add_argument("--query", type=int, help="tokens: show this query patch's row instead of the mean received")


def _add_ats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ats-blocks", type=int, nargs="+", help="blocks that sample (default: apply_ats's, 3..11)")
    p.add_argument("--budget", help="tokens per ATS block: none, a count (an integer >= 1) or a ratio in (0, 1]")
    p.add_argument("--sampler", default="inverse_transform", help="inverse_transform or topk")
    p.add_argument("--mask-images", type=int, default=6, help="images shown in the kept-token masks figure")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze", help="token grouping, attention maps and ATS masks (figures + JSON/CSV)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    for name, (add_arguments, func, num_images, dataset_level) in table.items():
        sub = analyses.add_parser(
            name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name],
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        _add_common(sub, num_images, dataset_level)
        add_arguments(sub)
        sub.set_defaults(func=run, run_analysis=func)


def run(args) -> int:
    _check_arguments(args)
    return int(args.run_analysis(args) or 0)


def _check_arguments(args) -> None:
    """Counts, the device and the output path, before a model is built or an image read."""
    from ravit.ats import parse_budget
    from ravit.outputs import check_output_dir

    counts = [("--num-images", args.num_images, 1), ("--batch-size", args.batch_size, 1),
              ("--workers", args.workers, 0)]
    counts += [(f"--{name.replace('_', '-')}", getattr(args, name), 1) for name in ("k", "mask_images")
               if hasattr(args, name)]
    for flag, value, least in counts:
        if value < least:
            raise InvalidArgumentError(f"{flag} must be at least {least}, got {value}")
    for std in getattr(args, "noise_std", None) or []:
        if not std >= 0 or std == float("inf"):
            raise InvalidArgumentError(f"--noise-std must be finite and >= 0, got {std}")
    if getattr(args, "budget", None) is not None:
        try:
            parse_budget(args.budget)  # its form here; its range against the model in apply_ats
        except InvalidArgumentError as err:
            raise InvalidArgumentError(f"--budget: {err}") from None
    resolve_device(args.device)
    check_output_dir(_output_path(args))


# --- model and data -----------------------------------------------------------------------------------------------
def _load_model(args) -> torch.nn.Module:
    import ravit

    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise MissingFileError(f"checkpoint not found: {args.checkpoint}")
    kwargs = parse_model_kwargs(args.model_kwargs)
    torch.manual_seed(args.seed)  # random-weight models (no --pretrained / --checkpoint) are then reproducible
    # An analysis of a checkpoint with a re-initialised classifier would describe random weights: no new head here.
    model = ravit.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                               new_head=False, **kwargs)
    return model.eval().to(resolve_device(args.device))


def _input_spec(model: torch.nn.Module) -> tuple[tuple[int, int], int]:
    """((H, W), channels) the images are brought to: the model's fixed or nominal size, its stem's channels."""
    from timm.data import resolve_data_config

    from ravit.analysis.features import expected_image_size, input_channels

    cfg = resolve_data_config({}, model=model)
    size = expected_image_size(model)
    nominal = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None and nominal is not None:
        size = (nominal, nominal) if isinstance(nominal, int) else tuple(nominal)
    if size is None:
        size = tuple(cfg["input_size"][-2:])
    return (int(size[0]), int(size[1])), input_channels(model) or int(cfg["input_size"][0])


def _dataset(args, model: torch.nn.Module):
    from timm.data import resolve_data_config
    from torchvision.datasets import ImageFolder

    from ravit.data import create_dataset, create_transform, dataset_info

    size, chans = _input_spec(model)
    name = args.dataset.replace("-", "_")
    folder = Path(args.dataset)
    if name != "fashion_mnist" and not folder.is_dir():
        raise CLIError(f"--dataset {args.dataset!r} is neither 'fashion_mnist' nor an existing folder")
    info = dataset_info("fashion_mnist" if name == "fashion_mnist" else "imagefolder")
    stats = dict(mean=info.mean, std=info.std, crop_pct=info.crop_pct)  # what `ravit train` normalises with
    if args.pretrained:  # shipped weights: the statistics they were trained with, from their pretrained config
        cfg = resolve_data_config({}, model=model)
        stats = dict(mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])
    transform = create_transform(size, chans, **stats)
    if name == "fashion_mnist":
        return create_dataset(name, args.split, args.data_dir, transform)
    if (folder / args.split).is_dir():
        return create_dataset("imagefolder", args.split, folder, transform)
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise InvalidArgumentError(f"image folder {folder} holds no <class>/<image> files: {err}") from None


def _subset(dataset, indices: list[int]):
    from torch.utils.data import Subset

    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise InvalidArgumentError(f"image indices {bad} outside the dataset's {len(dataset)} images")
    return Subset(dataset, indices)


def _batches(args, model, desc: str):
    """Batches of the first --num-images images on the device, with a progress bar."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    if args.num_images < 1:
        raise InvalidArgumentError(f"--num-images must be >= 1, got {args.num_images}")
    dataset = _dataset(args, model)
    subset = _subset(dataset, list(range(min(args.num_images, len(dataset)))))
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    device = next(model.parameters()).device
    for images, _ in tqdm(loader, desc=desc, unit="batch"):
        yield images.to(device)


def _images(args, model, count: int) -> tuple[torch.Tensor, list[int], list[int]]:
    """(images (B, C, H, W) on the device, their dataset indices, their labels): --indices, else the first count."""
    dataset = _dataset(args, model)
    if count < 1:
        raise InvalidArgumentError(f"the number of images shown must be >= 1, got {count}")
    indices = getattr(args, "indices", None) or list(range(min(count, len(dataset))))
    items = [_subset(dataset, indices)[i] for i in range(len(indices))]
    images = torch.stack([image for image, _ in items]).to(next(model.parameters()).device)
    return images, indices, [int(label) for _, label in items]


def _output_path(args) -> Path:
    return Path(args.output) if args.output else Path("runs/analyze") / args.model.replace("/", "_")


def _output(args) -> Path:
    path = _output_path(args)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _header(args, **extra) -> dict:
    return dict(
        analysis=args.analysis, model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
        model_kwargs=parse_model_kwargs(args.model_kwargs), dataset=args.dataset, split=args.split, **extra,
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
    images, indices, labels = _images(args, model, args.num_images)
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
    images, indices, labels = _images(args, model, args.num_images)
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
    from ravit.ats import parse_budget

    model = _load_model(args)
    kwargs = dict(sampler=args.sampler)
    if args.ats_blocks:
        kwargs["blocks"] = args.ats_blocks
    if args.budget is not None:
        kwargs["budget"] = parse_budget(args.budget)
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
