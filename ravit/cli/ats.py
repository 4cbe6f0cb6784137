"""``ravit ats``: accuracy and cost of a model with and without Adaptive Token Sampling (Fayyaz et al., ECCV 2022).

    ravit ats MODEL DATA [--checkpoint PATH] --blocks 3-11 --budget none|K|RATIO [...]

MODEL is any ravit / timm model name (``--model-kwargs`` for its arguments, ``--pretrained`` for shipped weights,
``--checkpoint`` for a file). DATA is ``fashion-mnist`` or an image folder (``<folder>/<class>/<image>`` or
``<folder>/<split>/<class>/<image>``); images are sized and normalised by the model's timm data config.
Writes to ``--output``: ``ats.json`` (settings, accuracies, GMACs percentiles, kept-token statistics and histograms),
``ats_images.csv`` (per image), ``ats_blocks.csv`` (per ATS block), ``ats_tokens.png`` (kept-token histograms),
``ats_gmacs.png`` (per-image GMACs) and ``ats_masks.png`` (kept tokens of each block over sample images).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timm.data import resolve_data_config
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ravit.cli import CLIError
from ravit.cli._args import add_weight_arguments, parse_model_kwargs, resolve_device
from ravit.errors import InvalidArgumentError, MissingFileError

__all__ = ["register", "run"]

_PERCENTILES = (5, 25, 50, 75, 95)


def _parse_blocks(items: list[str]) -> list[int]:
    """``3 4 5``, ``3-11`` (inclusive) or a mix."""
    blocks = []
    for item in items:
        first, sep, last = item.partition("-")
        try:
            blocks.extend(range(int(first), int(last) + 1) if sep else [int(item)])
        except ValueError:
            raise CLIError(f"--blocks expects block indices or ranges like 3-11, got {item!r}") from None
    return blocks


def _parse_budget(items: list[str]) -> int | float | None | list:
    """``none`` | an int count | a ratio with a decimal point; one value, or one per ATS block."""
    from ravit.ats import parse_budget

    values = []
    for item in items:
        try:
            values.append(parse_budget(item))
        except InvalidArgumentError:
            raise CLIError(
                f"--budget expects 'none', an int token count >= 1 or a ratio in (0, 1] like 0.7, got {item!r}"
            ) from None
    return values[0] if len(values) == 1 else values


def _check_arguments(args) -> None:
    """Counts and paths, before a model is built or an image read."""
    for flag, value, least in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                               ("--num-images", args.num_images, 1), ("--workers", args.workers, 0)):
        if value is not None and value < least:
            raise CLIError(f"{flag} must be at least {least}, got {value}")


def register(subparsers) -> None:
    p = subparsers.add_parser("ats", help="accuracy and GMACs with and without ATS, kept-token histograms and masks",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="ravit / timm model name, e.g. deit_small_patch16_224")
    p.add_argument("data", metavar="DATA", help="'fashion-mnist' or an image folder")
    add_weight_arguments(p)
    p.add_argument("--blocks", nargs="+", default=["3-11"], help="ATS blocks, e.g. 3-11 or 4 7 10 (default 3-11)")
    p.add_argument("--budget", nargs="+", default=["none"],
                   help="K per ATS block: none (all tokens, the released default), an int count of patch tokens, "
                        "or a ratio in (0, 1]; one value or one per block")
    p.add_argument("--sampler", default="inverse_transform", choices=["inverse_transform", "topk"])
    p.add_argument("--split", default="test", help="dataset split (default test)")
    p.add_argument("--data-dir", help="folder of the Fashion-MNIST files (default: the Debian package's)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="data loader workers")
    p.add_argument("--num-images", type=int, default=8, help="sample images in ats_masks.png")
    p.add_argument("--device", default="auto", help="'cpu', 'cuda', ... ('auto': cuda when available)")
    p.add_argument("--output", help="output folder (default runs/ats/<MODEL>)")
    p.set_defaults(func=run)


def _dataset(args, model: torch.nn.Module):
    from ravit.data import create_dataset, create_transform

    cfg = resolve_data_config(model=model)
    in_chans, height, width = cfg["input_size"]
    embed = model.patch_embed  # the model's own size and channels win over its pretrained config's (img_size=28 ...)
    if getattr(embed, "img_size", None) is not None and not getattr(embed, "dynamic_img_size", False):
        in_chans, (height, width) = embed.proj.in_channels, embed.img_size
    transform = create_transform(
        (height, width), in_chans, cfg["mean"], cfg["std"], crop_pct=cfg["crop_pct"],
        interpolation=cfg["interpolation"],
    )
    if args.data.lower() in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return create_dataset("fashion_mnist", args.split, args.data_dir, transform)
    folder = Path(args.data)
    if not folder.is_dir():
        raise MissingFileError(f"DATA must be 'fashion-mnist' or an image folder; {folder} is not a directory")
    if (folder / args.split).is_dir():
        return create_dataset("imagefolder", args.split, folder, transform)
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise InvalidArgumentError(f"image folder {folder} has no <class>/<image> files: {err}") from None


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    out = dict(mean=values.mean().item(), std=values.std(unbiased=False).item(), min=values.min().item(),
               max=values.max().item())
    out.update({f"p{q}": torch.quantile(values, q / 100).item() for q in _PERCENTILES})
    return out


def run(args) -> int:
    import ravit
    from ravit.analysis.ats_masks import kept_token_histogram, kept_token_masks
    from ravit.analysis.plots import plot_histogram, plot_image_maps, plot_token_histogram
    from ravit.analysis.results import write_csv, write_json
    from ravit.ats import apply_ats, remove_ats, trace
    from ravit.bench.flops import count_gmacs
    from ravit.outputs import check_output_dir

    blocks, budget = _parse_blocks(args.blocks), _parse_budget(args.budget)
    _check_arguments(args)
    device = resolve_device(args.device)
    out = check_output_dir(args.output or Path("runs/ats") / args.model)
    model = ravit.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                               new_head=False, **parse_model_kwargs(args.model_kwargs)).eval().to(device)
    apply_ats(model, blocks=blocks, budget=budget, sampler=args.sampler)  # validates before any data is read
    config = dict(blocks=list(model.ats_config.blocks), budgets=list(model.ats_config.budgets), sampler=args.sampler)
    remove_ats(model)

    dataset = _dataset(args, model)
    if args.limit is not None:
        dataset = Subset(dataset, range(min(args.limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    first_images, _ = next(iter(loader))
    dense_gmacs = count_gmacs(model, first_images[:1].to(device))

    labels, dense_pred, ats_pred, kept, gmacs = [], [], [], [], []
    shown_images, shown_indices = [], []
    with torch.no_grad():
        for images, targets in tqdm(loader, desc=f"ats {args.model}", unit="batch"):
            images = images.to(device)
            dense_pred.append(model(images).argmax(-1).cpu())
            apply_ats(model, blocks=blocks, budget=budget, sampler=args.sampler)
            result = trace(model, images)
            remove_ats(model)
            ats_pred.append(result.logits.argmax(-1).cpu())
            labels.append(torch.as_tensor(targets))
            kept.append(result.kept_tokens)
            gmacs.append(result.gmacs)
            need = args.num_images - sum(len(x) for x in shown_images)
            if need > 0:
                shown_images.append(images[:need].cpu())
                shown_indices.append([idx[:need] for idx in result.kept_indices])
    labels, dense_pred, ats_pred = torch.cat(labels), torch.cat(dense_pred), torch.cat(ats_pred)
    kept, gmacs = torch.cat(kept), torch.cat(gmacs)  # (N, S), (N,)

    block_names = [f"blocks.{b}" for b in config["blocks"]]
    max_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    histogram = kept_token_histogram(kept, max_tokens)  # (S, max_tokens + 1)
    acc_dense = (dense_pred == labels).double().mean().item()
    acc_ats = (ats_pred == labels).double().mean().item()
    record = dict(
        model=args.model, checkpoint=args.checkpoint, data=args.data, split=args.split, num_images=len(labels),
        ats=config,
        accuracy=dict(dense=acc_dense, ats=acc_ats, agreement=(dense_pred == ats_pred).double().mean().item()),
        gmacs=dict(dense=dense_gmacs, ats=_summary(gmacs), ratio=gmacs.mean().item() / dense_gmacs),
        kept_tokens=[dict(block=name, **_summary(kept[:, j])) for j, name in enumerate(block_names)],
        kept_token_histogram=dict(
            max_tokens=max_tokens, counts={n: h.tolist() for n, h in zip(block_names, histogram, strict=True)}
        ),
    )
    grid = tuple(model.patch_embed.grid_size)
    per_block_indices = [sum((chunk[j] for chunk in shown_indices), []) for j in range(len(block_names))]
    masks = kept_token_masks(per_block_indices, grid).float()  # (S, B, h, w)
    images = torch.cat(shown_images)
    paths = [
        write_json(out / "ats.json", record),
        write_csv(out / "ats_images.csv", ["index", "label", "pred_dense", "pred_ats", "gmacs", *block_names],
                  [[i, int(labels[i]), int(dense_pred[i]), int(ats_pred[i]), float(gmacs[i]), *kept[i].tolist()]
                   for i in range(len(labels))]),
        write_csv(out / "ats_blocks.csv", ["block", "mean", "std", "min", "max", *[f"p{q}" for q in _PERCENTILES]],
                  [[r["block"], r["mean"], r["std"], r["min"], r["max"], *[r[f"p{q}"] for q in _PERCENTILES]]
                   for r in record["kept_tokens"]]),
        plot_token_histogram(out / "ats_tokens.png", histogram, block_names,
                             f"ATS tokens kept per block: {args.model}"),
        plot_histogram(out / "ats_gmacs.png", gmacs, "GMACs per image",
                       f"ATS GMACs per image: {args.model} (dense {dense_gmacs:.3g})"),
        plot_image_maps(out / "ats_masks.png", images, {n: masks[j] for j, n in enumerate(block_names)},
                        f"ATS kept tokens (bright) per block: {args.model}", "kept"),
    ]

    print(f"{args.model} on {args.data} ({args.split}, {len(labels)} images), ATS blocks {config['blocks']}, "
          f"budget {budget}, sampler {args.sampler}")
    print(f"  accuracy: dense {100 * acc_dense:.2f}%  ATS {100 * acc_ats:.2f}%")
    print(f"  GMACs/image: dense {dense_gmacs:.4f}  ATS mean {record['gmacs']['ats']['mean']:.4f} "
          f"(p5 {record['gmacs']['ats']['p5']:.4f}, p95 {record['gmacs']['ats']['p95']:.4f}), "
          f"ratio {record['gmacs']['ratio']:.3f}")
    for row in record["kept_tokens"]:
        print(f"  {row['block']:>10}: kept tokens mean {row['mean']:.1f} (min {row['min']:.0f}, max {row['max']:.0f})")
    print("  wrote " + ", ".join(str(p) for p in paths))
    return 0
