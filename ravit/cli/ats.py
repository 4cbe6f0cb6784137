"""``ravit ats``: accuracy and cost of a model with and without Adaptive Token Sampling (Fayyaz et al., ECCV 2022).

    ravit ats MODEL [--data NAME_OR_FOLDER] [--checkpoint PATH | --pretrained] --blocks 3-11 --budget none|K|RATIO
              [--sampler inverse_transform|topk] [--schedule each|linear] [--fuse none|nearest] [--static]
              [--score attention_value|attention] [--score-power P] [--redundancy G]

MODEL is any ravit / timm model name (``--model-kwargs`` for its arguments, ``--pretrained`` for shipped weights,
``--checkpoint`` for a file). ``--data`` is ``fashion-mnist`` or an image folder (``<folder>/<class>/<image>`` or
``<folder>/<split>/<class>/<image>``); images are sized and normalised as the model expects (``ravit.data.ModelInput``).
Writes to ``--output`` (default ``runs/ats/<MODEL>``): ``ats.json`` (settings, accuracies, GMACs percentiles, kept-token
statistics and histograms), ``ats_images.csv`` (per image), ``ats_blocks.csv`` (per ATS block), ``ats_tokens.png``
(kept-token histograms), ``ats_gmacs.png`` (per-image GMACs) and ``ats_masks.png`` (kept tokens of each block over
sample images).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ravit.cli._args import (
    add_count_argument,
    add_data_arguments,
    add_device_argument,
    add_list_argument,
    add_model_arguments,
    add_output_argument,
    add_value_argument,
    block_indices,
    budget,
    build_model,
    model_input,
    non_negative,
    output_dir,
    positive,
    resolve_device,
)

__all__ = ["register", "run"]

_PERCENTILES = (5, 25, 50, 75, 95)


def register(subparsers) -> None:
    p = subparsers.add_parser("ats", help="accuracy and GMACs with and without ATS, kept-token histograms and masks",
                              description=__doc__)
    add_model_arguments(p)
    add_data_arguments(p)
    add_list_argument(p, "--blocks", block_indices, "ATS blocks: indices and inclusive ranges, e.g. 3-11 or 4,7,10 "
                      "(default: 3-11)", default=list(range(3, 12)), metavar="BLOCK")
    add_list_argument(p, "--budget", budget, "tokens per ATS block: none (all tokens, the released default), an int "
                      "count of patch tokens or a ratio in (0, 1]; one value or one per block (default: none)",
                      default=[None], metavar="BUDGET")
    p.add_argument("--sampler", default="inverse_transform", choices=["inverse_transform", "topk"],
                   help="inverse_transform (the paper's) or topk (the ablation)")
    p.add_argument("--schedule", default="each", choices=["each", "linear"],
                   help="each (the paper's: every ATS block gets the budget; a ratio is of the tokens entering it) or "
                   "linear (one budget = patch tokens left after the last ATS block, a ratio of the original count, "
                   "reached linearly)")
    p.add_argument("--fuse", default="none", choices=["none", "nearest"],
                   help="none (the paper's: dropped tokens leave) or nearest (each dropped token is averaged into its "
                   "most similar kept token; attention then weighs tokens by what they hold)")
    p.add_argument("--static", action="store_true",
                   help="exactly K slots per image at every ATS block (int budgets or --schedule linear): shapes "
                   "that depend on the budget only, as an exported model runs")
    p.add_argument("--score", default="attention_value", choices=["attention_value", "attention"],
                   help="attention_value (the paper's: class attention x value norm) or attention (class attention "
                   "alone, the ablation)")
    add_value_argument(p, "--score-power", positive, "the sampler sees score^P: 1 (the paper's) or below 1 to "
                       "flatten the scores, so inverse transform sampling keeps more distinct tokens (ravit's "
                       "option; not with --sampler topk)", default=1.0, metavar="P")
    add_value_argument(p, "--redundancy", non_negative, "scores times (1 - similarity to a more important "
                       "token)^G, so near-duplicates of kept tokens go first (with --fuse nearest: merge into them); "
                       "0 (off) is the paper's, 6 what ravit's benchmark uses (ravit's option)", default=0.0,
                       metavar="G")
    add_count_argument(p, "--limit", None, "use only the first N images")
    add_count_argument(p, "--batch-size", 64, "images per batch")
    add_count_argument(p, "--workers", 0, "data loader workers", least=0)
    add_count_argument(p, "--mask-images", 8, "sample images shown in ats_masks.png")
    add_device_argument(p)
    add_output_argument(p, "ats")
    p.set_defaults(func=run)


def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    out = dict(mean=values.mean().item(), std=values.std(unbiased=False).item(), min=values.min().item(),
               max=values.max().item())
    out.update({f"p{q}": torch.quantile(values, q / 100).item() for q in _PERCENTILES})
    return out


def run(args) -> int:
    from ravit.analysis.ats_masks import kept_token_histogram, kept_token_masks
    from ravit.analysis.plots import plot_histogram, plot_image_maps, plot_token_histogram
    from ravit.analysis.results import write_csv, write_json
    from ravit.ats import apply_ats, remove_ats, trace
    from ravit.bench.flops import count_gmacs
    from ravit.data import open_data

    blocks, per_block = args.blocks, args.budget[0] if len(args.budget) == 1 else args.budget
    options = dict(sampler=args.sampler, schedule=args.schedule, fuse=args.fuse, static=args.static, score=args.score,
                   score_power=args.score_power, redundancy=args.redundancy)
    device = resolve_device(args.device)
    out = output_dir(args, "ats", args.model)
    model = build_model(args).to(device)
    apply_ats(model, blocks=blocks, budget=per_block, **options)  # validates before any data is read
    config = dict(blocks=list(model.ats_config.blocks), budgets=list(model.ats_config.budgets), **options)
    remove_ats(model)

    transform = model_input(model, args.data, args.pretrained).transform()
    dataset = open_data(args.data, args.split, args.data_dir, transform)
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
            apply_ats(model, blocks=blocks, budget=per_block, **options)
            result = trace(model, images)
            remove_ats(model)
            ats_pred.append(result.logits.argmax(-1).cpu())
            labels.append(torch.as_tensor(targets))
            kept.append(result.kept_tokens)
            gmacs.append(result.gmacs)
            need = args.mask_images - sum(len(x) for x in shown_images)
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
          f"budget {per_block}, sampler {args.sampler}, schedule {args.schedule}, fuse {args.fuse}, "
          f"score {args.score}{'' if args.score_power == 1 else f'^{args.score_power:g}'}"
          f"{'' if not args.redundancy else f', redundancy {args.redundancy:g}'}"
          f"{', static' if args.static else ''}")
    print(f"  accuracy: dense {100 * acc_dense:.2f}%  ATS {100 * acc_ats:.2f}%")
    print(f"  GMACs/image: dense {dense_gmacs:.4f}  ATS mean {record['gmacs']['ats']['mean']:.4f} "
          f"(p5 {record['gmacs']['ats']['p5']:.4f}, p95 {record['gmacs']['ats']['p95']:.4f}), "
          f"ratio {record['gmacs']['ratio']:.3f}")
    for row in record["kept_tokens"]:
        print(f"  {row['block']:>10}: kept tokens mean {row['mean']:.1f} (min {row['min']:.0f}, max {row['max']:.0f})")
    print("  wrote " + ", ".join(str(p) for p in paths))
    return 0
