"""``ravit robustness MODEL --data ...``: corruption robustness (on the fly or ImageNet-C), ImageNet-A/R/Sketch.

Writes ``robustness.json``, ``robustness.csv`` and plots under ``--out``. Under ``torchrun`` every rank scores a
shard (gloo on CPU, NCCL on GPUs) and rank 0 writes.
"""

from __future__ import annotations

import argparse
import os

from ravit.cli.corrupt import check_positive, parse_severities
from ravit.errors import InvalidArgumentError, MissingFileError
from ravit.outputs import check_output_dir

BENCHMARKS = ("corrupt", "imagenet-c", "imagenet-a", "imagenet-r", "sketch", "folder")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "robustness",
        help="evaluate a model under corruptions (on the fly or ImageNet-C), ImageNet-A/R/Sketch",
        description="Accuracy per corruption x severity, mean corruption accuracy (15 and 19), mCE and relative "
        "mCE (normalised by --mce-baseline), retention; or top-1 on ImageNet-A/R (200-class masks) and Sketch. "
        "Class folders are matched to the model's classes by name.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="model name (ravit or timm)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file loaded through ravit's loader")
    p.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights (zoo models)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--data", required=True,
                   help="'fashion-mnist' or an ImageFolder (corrupt, folder, imagenet-a/-r, sketch), or the "
                   "ImageNet-C root (imagenet-c)")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="corrupt",
                   help="corrupt: corrupt --data on the fly; imagenet-c: read <data>/<corruption>/<severity>/")
    p.add_argument("--clean", default=None, help="clean ImageFolder for imagenet-c (clean accuracy, retention)")
    p.add_argument("--corruptions", default="all", help="names or groups: all, benchmark, extra, noise, ...")
    p.add_argument("--severities", default="1,2,3,4,5")
    p.add_argument("--split", default="test", help="Fashion-MNIST split")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of each set")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="'auto' (default: cuda if available, else cpu), 'cpu', 'cuda:N'")
    p.add_argument("--mce-baseline", default="alexnet",
                   help="errors an mCE divides by: 'alexnet' (AlexNet's ImageNet-C table, averaged over severities "
                   "1-5) or another model's robustness.json (per severity)")
    p.add_argument("--out", default="robustness-results")
    p.set_defaults(func=run)


def _init_distributed(device: str) -> tuple[bool, str]:
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False, device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True, device


def _create_model(args):
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans),
                                ("img_size", args.img_size)) if v is not None}
    from ravit import create_model

    # Scoring a checkpoint with a re-initialised classifier would report chance accuracy: never allow a new head here.
    return create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, new_head=False,
                        **kwargs)


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from ravit.cli._args import resolve_device
    from ravit.robustness import resolve_corruptions
    from ravit.robustness.evaluate import (
        ModelInput,
        evaluate_corruptions,
        evaluate_folder,
        evaluate_imagenet_c,
        image_dataset,
    )
    from ravit.robustness.metrics import resolve_baseline

    names = resolve_corruptions(args.corruptions)
    sevs = parse_severities(args.severities)
    check_positive(batch_size=args.batch_size, limit=args.limit)
    if args.workers < 0:
        raise InvalidArgumentError(f"--workers must be 0 or more, got {args.workers}")
    if args.checkpoint is not None and not os.path.isfile(args.checkpoint):
        raise MissingFileError(f"checkpoint not found: {args.checkpoint}")
    if args.benchmark == "corrupt" and args.data != "fashion-mnist" and not os.path.isdir(args.data):
        raise MissingFileError(f"dataset folder not found: {args.data}")
    device = str(resolve_device(args.device))
    check_output_dir(args.out, "--out")
    baseline = resolve_baseline(args.mce_baseline)
    distributed, device = _init_distributed(device)
    try:
        torch.manual_seed(args.seed)  # every rank builds the same weights when none are loaded
        model = _create_model(args)
        common = dict(name=args.model, batch_size=args.batch_size, limit=args.limit, device=device,
                      workers=args.workers)
        if args.benchmark == "corrupt":
            dataset = image_dataset(args.data, ModelInput.from_model(model), args.split, args.data_dir)
            result = evaluate_corruptions(model, dataset, names, sevs, seed=args.seed, **common)
        elif args.benchmark == "imagenet-c":
            result = evaluate_imagenet_c(model, args.data, names, sevs, clean_root=args.clean, **common)
        else:
            result = evaluate_folder(model, args.data, args.benchmark, **common)
        result.meta["data"] = args.data
        result.baseline = baseline
        if not distributed or dist.get_rank() == 0:
            paths = result.save(args.out)
            _print_summary(result)
            print("wrote " + ", ".join(str(p) for p in paths))
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _print_summary(result) -> None:
    from ravit.robustness.metrics import ALEXNET

    s = result.summary()
    if not result.counts:
        print(f"{result.benchmark} top-1: {_pct(s['accuracy'])} ({result.clean[1]} images)")
        return
    print(f"clean accuracy:                     {_pct(s['clean_accuracy'])}")
    print(f"mean corruption accuracy (15 std):  {_pct(s['mean_corruption_accuracy_15'])}")
    print(f"mean corruption accuracy (all {len(s['corruptions_in_all'])}):  "
          f"{_pct(s['mean_corruption_accuracy_all'])}")
    sevs = ",".join(map(str, s["mce_severities"])) or "none"
    label = f"{len(s['mce_corruptions'])} of 15 corruptions, severities {sevs}"
    flag = "" if s["mce_complete"] else "  [INCOMPLETE: not the published metric]"
    print(f"mCE (baseline {s['mce_baseline']}; {label}): {_pct(s['mce'])}{flag}")
    print(f"relative mCE (same baseline):       {_pct(s['relative_mce'])}{flag}")
    notes = list(s["mce_notes"])
    data = str(result.meta.get("data", ""))
    if result.baseline in (None, ALEXNET) and "imagenet" not in data.lower():
        notes.append(f"AlexNet's errors are ImageNet-C's: on {data or 'this data'} the normalisation is nominal "
                     "(use --mce-baseline with another model's robustness.json)")
    for note in notes:
        print(f"  note: {note}")
