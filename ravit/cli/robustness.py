"""``ravit robustness MODEL --data ...``: corruption robustness (on the fly or ImageNet-C), ImageNet-A/R/Sketch.

Accuracy per corruption x severity, mean corruption accuracy (15 and 19), mCE and relative mCE (normalised by
``--mce-baseline``), retention; or top-1 on ImageNet-A/R (200-class masks) and Sketch. Class folders are matched to
the model's classes by name. Writes ``robustness.json``, ``robustness.csv`` and plots under ``--output`` (default
``runs/robustness/<MODEL>``). Under ``torchrun`` every rank scores a shard (gloo on CPU, NCCL on GPUs) and rank 0
writes.
"""

from __future__ import annotations

import os

from ravit.cli._args import (
    add_bf16_argument,
    add_count_argument,
    add_data_arguments,
    add_device_argument,
    add_list_argument,
    add_model_arguments,
    add_output_argument,
    build_model,
    corruption,
    model_input,
    output_dir,
    resolve_device,
    severity,
)
from ravit.errors import InvalidArgumentError

BENCHMARKS = ("corrupt", "imagenet-c", "imagenet-a", "imagenet-r", "sketch", "folder")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "robustness",
        help="evaluate a model under corruptions (on the fly or ImageNet-C), ImageNet-A/R/Sketch",
        description=__doc__,
    )
    add_model_arguments(p)
    add_data_arguments(p, data_help="'fashion-mnist' or an image folder (corrupt, folder, imagenet-a/-r, sketch), or "
                                    "the ImageNet-C root <data>/<corruption>/<severity>/ (imagenet-c)")
    p.add_argument("--benchmark", choices=BENCHMARKS, default="corrupt",
                   help="corrupt: corrupt --data on the fly; imagenet-c: read <data>/<corruption>/<severity>/")
    p.add_argument("--clean", metavar="FOLDER", help="clean image folder for imagenet-c (clean accuracy, retention)")
    add_list_argument(p, "--corruptions", corruption, "names or groups: all, benchmark (15), extra (4), noise, blur, "
                      "weather, digital", default=["all"], metavar="NAME")
    add_list_argument(p, "--severities", severity, "severities in 1..5", default=[1, 2, 3, 4, 5], metavar="S")
    add_count_argument(p, "--limit", None, "only the first N images of each set")
    add_count_argument(p, "--batch-size", 64, "images per batch")
    add_count_argument(p, "--workers", 0, "data loader workers", least=0)
    p.add_argument("--seed", type=int, default=0, help="seeds the corruptions (and random weights)")
    add_device_argument(p)
    add_bf16_argument(p)
    p.add_argument("--mce-baseline", default="alexnet",
                   help="errors an mCE divides by: 'alexnet' (AlexNet's ImageNet-C table, averaged over severities "
                   "1-5) or another model's robustness.json (per severity)")
    add_output_argument(p, "robustness")
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


def run(args) -> int:
    import torch.distributed as dist

    from ravit.data import data_name
    from ravit.robustness import resolve_corruptions
    from ravit.robustness.evaluate import evaluate_corruptions, evaluate_folder, evaluate_imagenet_c, image_dataset
    from ravit.robustness.metrics import resolve_baseline

    names = resolve_corruptions(args.corruptions)
    if args.benchmark != "corrupt" and data_name(args.data) is not None:
        raise InvalidArgumentError(f"--benchmark {args.benchmark} reads a folder; --data {args.data} is a dataset name")
    device = str(resolve_device(args.device))
    out = output_dir(args, "robustness", args.model)
    baseline = resolve_baseline(args.mce_baseline)
    distributed, device = _init_distributed(device)
    try:
        model = build_model(args, seed=args.seed)  # seeded: every rank builds the same weights when none are loaded
        spec = model_input(model, args.data, args.pretrained)
        common = dict(name=args.model, batch_size=args.batch_size, limit=args.limit, device=device,
                      workers=args.workers, spec=spec, bf16=args.bf16)
        if args.benchmark == "corrupt":
            dataset = image_dataset(args.data, spec, args.split, args.data_dir)
            result = evaluate_corruptions(model, dataset, names, args.severities, seed=args.seed, **common)
        elif args.benchmark == "imagenet-c":
            result = evaluate_imagenet_c(model, args.data, names, args.severities, clean_root=args.clean, **common)
        else:
            result = evaluate_folder(model, args.data, args.benchmark, **common)
        result.meta["data"] = args.data
        result.baseline = baseline
        if not distributed or dist.get_rank() == 0:
            paths = result.save(out)
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
