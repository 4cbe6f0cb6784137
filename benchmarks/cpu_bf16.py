"""bf16 autocast against fp32 for FAN on the CPU: the speed-up, and how far the predictions move.

    .venv/bin/python benchmarks/cpu_bf16.py                       # speed of FAN-T/S, agreement of the FAN zoo models
    .venv/bin/python benchmarks/cpu_bf16.py --limit 2000 --json runs/bench/cpu_bf16.json

``speed``: each model's forward in fp32 and under ``torch.autocast('cpu', dtype=torch.bfloat16)``, alternating
rounds in one process (the same code both ways, so one process is fair), median of ``--iters`` forwards per round;
the speed-up of every round, their median and min–max. bf16 only pays on CPUs with native bf16 dot products
(AVX512-BF16 or AMX); the CPU's capability is printed.

``agreement``: every FAN model of the zoo on the Fashion-MNIST test split (``--limit`` images), fp32 against bf16
autocast: top-1 of each, the share of images whose top-1 class agrees, and the max |Δlogit|.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import ravit
from ravit.outputs import write_json


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _median_seconds(model: torch.nn.Module, images: torch.Tensor, bf16: bool, iters: int) -> float:
    times = []
    with torch.inference_mode(), _autocast(bf16):
        for i in range(2 + iters):
            start = time.perf_counter()
            model(images)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(names: list[str], batches: list[int], rounds: int, iters: int) -> list[dict]:
    rows = []
    for name in names:
        model = ravit.create_model(name).eval()
        for batch in batches:
            images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            fp32, bf16 = [], []
            for r in range(rounds):
                for low in (False, True) if r % 2 == 0 else (True, False):
                    (bf16 if low else fp32).append(_median_seconds(model, images, low, iters))
            ratios = [a / b for a, b in zip(fp32, bf16, strict=True)]
            rows.append(dict(model=name, batch=batch, fp32_ms=statistics.median(fp32) * 1e3,
                             bf16_ms=statistics.median(bf16) * 1e3, speedup=statistics.median(ratios),
                             speedup_min=min(ratios), speedup_max=max(ratios)))
            print(f"{name:24s} batch {batch:3d}  fp32 {rows[-1]['fp32_ms']:8.1f} ms  bf16 {rows[-1]['bf16_ms']:8.1f} ms"
                  f"  speed-up {rows[-1]['speedup']:.2f} ({min(ratios):.2f}–{max(ratios):.2f})", flush=True)
    return rows


def agreement(limit: int, batch_size: int) -> list[dict]:
    from ravit.data import ModelInput, dataset_info, open_data
    from ravit.models.zoo import list_zoo, load_manifest

    manifest = load_manifest()
    rows = []
    for name in list_zoo():
        if not manifest["models"][name]["architecture"].startswith("fan"):
            continue
        model = ravit.create_model(name, pretrained=True).eval()
        spec = ModelInput.from_model(model, trained_on=dataset_info("fashion_mnist"))
        dataset = open_data("fashion-mnist", "test", None, spec.transform())
        loader = DataLoader(Subset(dataset, range(min(limit, len(dataset)))), batch_size=batch_size)
        hits = {False: 0, True: 0}
        agree, count, delta = 0, 0, 0.0
        with torch.inference_mode():
            for images, targets in tqdm(loader, desc=f"{name} fp32 vs bf16", leave=False):
                logits = {low: model_logits(model, images, low) for low in (False, True)}  # each (B, classes)
                for low, out in logits.items():
                    hits[low] += int(out.argmax(-1).eq(targets).sum())
                agree += int(logits[False].argmax(-1).eq(logits[True].argmax(-1)).sum())
                delta = max(delta, (logits[False] - logits[True]).abs().max().item())
                count += len(targets)
        rows.append(dict(model=name, images=count, top1_fp32=100 * hits[False] / count,
                         top1_bf16=100 * hits[True] / count, top1_agreement=100 * agree / count,
                         max_abs_logit_diff=delta, manifest_top1=manifest["models"][name].get("test_top1")))
        print(f"{name}: top-1 fp32 {rows[-1]['top1_fp32']:.2f}%, bf16 {rows[-1]['top1_bf16']:.2f}%, same top-1 on "
              f"{rows[-1]['top1_agreement']:.2f}% of {count} images, max |Δlogit| {delta:.3g}", flush=True)
    return rows


def model_logits(model: torch.nn.Module, images: torch.Tensor, bf16: bool) -> torch.Tensor:
    with _autocast(bf16):
        return model(images).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fan_tiny_12_p16_224", "fan_small_12_p16_224"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--rounds", type=int, default=6, help="alternating fp32 / bf16 rounds")
    parser.add_argument("--iters", type=int, default=5, help="forwards per round (after 2 warm-up)")
    parser.add_argument("--limit", type=int, default=2000, help="test images for the agreement")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size for the agreement")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    result = dict(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                  speed=speed(args.models, args.batch_sizes, args.rounds, args.iters),
                  agreement=agreement(args.limit, args.batch_size))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
