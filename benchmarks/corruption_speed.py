"""Corruption throughput at 224 x 224: ravit (batched torch, CPU and CUDA if present) vs ``imagecorruptions``.

The reference is whichever ``imagecorruptions`` is installed (the numba fork ``imagecorruptions-imaug`` is the
fastest CPU implementation; it runs one image per call in one process). Each corruption runs at every severity
1-5; the overall rate is images / total time over all 19 kinds, so slow kinds weigh what they cost.

    python benchmarks/corruption_speed.py [--batch 32] [--ref-images 5] [--threads 2] [--no-gpu]

Prints one row per corruption, side by side, and writes the table as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ravit.robustness import ALL_CORRUPTIONS, SEVERITIES, corrupt


def photos(n: int, size: int = 224) -> np.ndarray:
    """n uint8 RGB photos (scikit-image's sample images when installed, else smooth random images)."""
    try:
        from PIL import Image
        from skimage import data

        names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
        base = [np.asarray(Image.fromarray(getattr(data, k)()).convert("RGB").resize((size, size))) for k in names]
    except ImportError:
        g = torch.Generator().manual_seed(0)
        small = torch.rand(5, 3, 16, 16, generator=g)
        up = torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic").clamp(0, 1)
        base = list((up * 255).round().byte().permute(0, 2, 3, 1).numpy())
    return np.stack([base[i % len(base)] for i in range(n)])


def time_reference(images: np.ndarray, name: str) -> float | None:
    """Seconds per image for the reference, over the images x severities 1-5 (after one warm-up call)."""
    try:
        from imagecorruptions import corrupt as ref_corrupt
    except ImportError:
        return None
    ref_corrupt(images[0], severity=1, corruption_name=name)  # numba compiles glass blur on first use
    start = time.perf_counter()
    for i, im in enumerate(images):
        ref_corrupt(im, severity=SEVERITIES[i % 5], corruption_name=name)
    return (time.perf_counter() - start) / len(images)


def time_ravit(batch: torch.Tensor, name: str, device: str) -> float:
    """Seconds per image for ravit on ``device``, one batch per severity 1-5 (after a warm-up batch)."""
    x = batch.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    corrupt(x[:2], name, 1, gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for s in SEVERITIES:
        corrupt(x, name, s, gen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(SEVERITIES) * len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="ravit batch size (CPU)")
    parser.add_argument("--gpu-batch", type=int, default=256, help="ravit batch size (CUDA)")
    parser.add_argument("--ref-images", type=int, default=5, help="reference calls per corruption (severities cycle)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--corruptions", default=",".join(ALL_CORRUPTIONS))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()

    names = args.corruptions.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() and not args.no_gpu
    ref_images = photos(args.ref_images, args.size)
    cpu_batch = torch.from_numpy(photos(args.batch, args.size)).permute(0, 3, 1, 2).float().div(255)
    gpu_batch = (
        torch.from_numpy(photos(args.gpu_batch, args.size)).permute(0, 3, 1, 2).float().div(255) if gpu else None
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if gpu else "") + f"; images {args.size}x{args.size}")
    header = f"{'corruption':18s} {'reference ms/img':>16s} {'ravit CPU ms/img':>16s} {'CPU speed-up':>12s}"
    if gpu:
        header += f" {'ravit GPU ms/img':>16s} {'GPU vs ref CPU':>14s}"
    print(header)
    rows, totals = [], {"ref": 0.0, "cpu": 0.0, "gpu": 0.0}
    for name in names:
        ref = time_reference(ref_images, name)
        cpu = time_ravit(cpu_batch, name, "cpu")
        row = {"corruption": name, "reference_s_per_img": ref, "ravit_cpu_s_per_img": cpu}
        line = f"{name:18s} {_ms(ref):>16s} {_ms(cpu):>16s} {_ratio(ref, cpu):>12s}"
        if gpu:
            g = time_ravit(gpu_batch, name, "cuda")
            row["ravit_gpu_s_per_img"] = g
            totals["gpu"] += g
            line += f" {_ms(g):>16s} {_ratio(ref, g):>14s}"
        totals["ref"] += ref or 0.0
        totals["cpu"] += cpu
        rows.append(row)
        print(line, flush=True)
    n = len(names)
    ref_rate = n / totals["ref"] if totals["ref"] else None
    summary = {"reference_img_per_s": ref_rate, "ravit_cpu_img_per_s": n / totals["cpu"]}
    line = (f"{'all ' + str(n) + ' (img/s)':18s} {_rate(ref_rate):>16s} {_rate(summary['ravit_cpu_img_per_s']):>16s}"
            f" {_ratio(totals['ref'] or None, totals['cpu']):>12s}")
    if gpu:
        summary["ravit_gpu_img_per_s"] = n / totals["gpu"]
        line += f" {_rate(summary['ravit_gpu_img_per_s']):>16s} {_ratio(totals['ref'] or None, totals['gpu']):>14s}"
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "summary": summary, "size": args.size, "batch": args.batch}, f, indent=2)


def _ms(s: float | None) -> str:
    return "n/a" if s is None else f"{1000 * s:.2f}"


def _rate(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.1f}"


def _ratio(ref: float | None, ours: float) -> str:
    return "n/a" if ref is None else f"{ref / ours:.1f}x"


if __name__ == "__main__":
    main()
