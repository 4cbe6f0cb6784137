"""FAN forward speed: GMACs per image, images per second, and utilisation of the machine's dense-matmul rate.

Utilisation = achieved GMAC/s (GMACs per image × images per second) ÷ the GMAC/s of a large dense fp32 matmul timed
by this script on the same machine in the same run, so numbers from different machines compare (issue 2 §4).

    .venv/bin/python benchmarks/fan_speed.py                        # CPU, fp32, batch 8 at 224
    .venv/bin/python benchmarks/fan_speed.py --device cuda --amp    # GPU, bf16 autocast

``--official-src DIR`` compares ravit with the released FAN code (a folder holding its ``models/`` package, e.g. a
clone of NVlabs/FAN; never part of this repository) the way a user would: each side in a subprocess of its own
(``benchmarks/fan_worker.py``), the released code on its own timm 0.5.4 (installed once with ``pip --target`` into
``--official-timm``), alternating official / ravit over ``--pairs`` pairs with the order swapped every pair, the
same random weights (saved once by the released code under its key names, loaded by both) and the same inputs. It
prints both medians, the ratio (released time ÷ ravit time: above 1 means ravit is faster) of every pair, their
median and min–max, and the max |Δlogit| between the two sides. ravit's side uses its CPU kernels when they are built
(``ravit kernels build``; the header says whether they ran); ``RAVIT_CPU_KERNELS=0`` in the environment times its
oneDNN path instead.

    .venv/bin/python benchmarks/fan_speed.py --official-src ~/src/FAN --batch-size 8 --pairs 5

``--breakdown`` (CPU) profiles one model's forward and splits its time into matmuls, attention kernels, convolutions,
GELU and everything else, and prints the utilisation that would remain if everything else cost nothing: an upper
bound on what any implementation built on these kernels can reach.

Timings are medians over ``--iters`` runs after warm-up; on a machine shared with other jobs the 2-thread numbers
swing widely (OpenMP threads wait on a busy core), so benchmark on a quiet machine or pass ``--threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import ravit
from ravit.bench.flops import count_gmacs
from ravit.outputs import write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gmacs_per_s(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    """GMAC/s of an n×n @ n×n matmul: the practical peak for dense work on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(a, b), device, iters, warmup=2)
    return n**3 / seconds / 1e9


def bench_model(name: str, device: torch.device, batch: int, img: int, iters: int, amp: bool, compiled: bool) -> dict:
    model = ravit.create_model(name).eval()
    gmacs = count_gmacs(model, torch.randn(1, 3, img, img))  # counted on CPU: the same ops run on any device
    model.to(device)
    if compiled:
        model = torch.compile(model)  # the warm-up runs below include the (one-off) compilation
    images = torch.randn(batch, 3, img, img, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def run():
        with torch.inference_mode(), autocast:
            model(images)

    seconds = _median_seconds(run, device, iters, warmup=3)
    return dict(model=name, gmacs_per_image=gmacs, images_per_s=batch / seconds, ms_per_batch=seconds * 1e3,
                gmacs_per_s=gmacs * batch / seconds)


# aten kernels by kind; self time only, so wrappers (linear, matmul, scaled_dot_product_attention) count once.
KINDS = {
    "matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
    "convolution": ("aten::mkldnn_convolution", "aten::_convolution", "aten::thnn_conv2d",
                    "mkldnn::_convolution_pointwise",  # ravit's inference path: conv (+ folded BN, + GELU)
                    "ravit::dwconv_chain"),  # ravit's CPU kernel: depthwise conv, GELU, BN, depthwise conv
    "gelu": ("aten::gelu",),
}


def breakdown(name: str, batch: int, img: int, peak: float, iters: int) -> dict:
    """Per-kind self time of a CPU forward (torch.profiler), and the utilisation if only the kinds listed in
    ``KINDS`` took time: the bound for implementations on these kernels (issue 2's 85% goal is checked against it)."""
    model = ravit.create_model(name).eval()
    gmacs = count_gmacs(model, torch.randn(1, 3, img, img))
    images = torch.randn(batch, 3, img, img)
    with torch.inference_mode():
        for _ in range(2):
            model(images)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(images)
    per_kind = dict.fromkeys([*KINDS, "other"], 0.0)
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), "other")
        per_kind[kind] += event.self_cpu_time_total / iters / 1e6  # seconds per forward
    floor = sum(v for k, v in per_kind.items() if k != "other")
    return dict(model=name, seconds_per_batch=per_kind, total=sum(per_kind.values()),
                bound_utilisation=gmacs * batch / floor / peak)


WORKER = Path(__file__).with_name("fan_worker.py")


def official_timm(target: Path) -> Path:
    """A folder holding timm 0.5.4, the version the released FAN code pins; installed there on first use."""
    if not (target / "timm" / "version.py").is_file():
        print(f"installing timm 0.5.4 into {target} (the released FAN code's version)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        "timm==0.5.4"], check=True)
    return target


def _worker(side: str, env: dict, *args: str) -> dict | None:
    """Run one side of the comparison in a fresh interpreter; its last stdout line is a JSON result."""
    done = subprocess.run([sys.executable, str(WORKER), "--side", side, *args], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def compare_released(args) -> list[dict]:
    """Released code against ravit, each in its own process, alternating (see the module docstring)."""
    src = Path(args.official_src).expanduser().resolve()
    if not (src / "models" / "fan.py").is_file():
        raise SystemExit(f"--official-src {src}: no models/fan.py there; point it at a clone of NVlabs/FAN")
    official_path = os.pathsep.join([str(official_timm(Path(args.official_timm).expanduser())), str(src)])
    # the released side sees only its folder and timm 0.5.4; ravit's side runs in the caller's environment as is
    envs = {"official": dict(os.environ, PYTHONPATH=official_path), "ravit": dict(os.environ)}
    common = ["--iters", str(args.iters), "--device", args.device]
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--amp"] if args.amp else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp, "inputs.pt")
        torch.save(torch.randn(args.batch_size, 3, args.img_size, args.img_size,
                               generator=torch.Generator().manual_seed(0)), inputs)
        for name in args.models:
            weights = Path(tmp, f"{name}.pth")
            _worker("official", envs["official"], "--model", name, "--save-weights", str(weights))
            medians = {"official": [], "ravit": []}
            faults = {"official": [], "ravit": []}
            for pair in range(args.pairs):
                for side in ("official", "ravit") if pair % 2 == 0 else ("ravit", "official"):
                    logits = ["--logits", str(Path(tmp, f"{side}.pt"))] if pair == 0 else []
                    result = _worker(side, envs[side], "--model", name, "--weights", str(weights), "--inputs",
                                     str(inputs), *logits, *common)
                    medians[side].append(result["median_s"])
                    faults[side].append(result["minor_faults_per_forward"])
                    if side == "official":
                        versions = result["timm"]
                    else:
                        kernels = result["cpu_kernels"]
            ratios = [o / r for o, r in zip(medians["official"], medians["ravit"], strict=True)]
            delta = (torch.load(Path(tmp, "official.pt")) - torch.load(Path(tmp, "ravit.pt"))).abs().max().item()
            rows.append(dict(model=name, official_median_ms=[m * 1e3 for m in medians["official"]],
                             ravit_median_ms=[m * 1e3 for m in medians["ravit"]], ratios=ratios,
                             ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                             max_abs_logit_diff=delta, official_timm=versions, ravit_cpu_kernels=kernels,
                             official_faults_per_forward=statistics.median(faults["official"]),
                             ravit_faults_per_forward=statistics.median(faults["ravit"])))
    print(f"released code (timm {rows[0]['official_timm'] if rows else '?'}, own process) vs ravit "
          f"(timm {__import__('timm').__version__}, own process, its CPU kernels "
          f"{'on' if rows and rows[0]['ravit_cpu_kernels'] else 'off'}); {args.device}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, batch {args.batch_size} at {args.img_size}, median of "
          f"{args.iters} forwards per process, {args.pairs} alternating pairs; ratio = released ÷ ravit time")
    print(f"{'model':24s} {'released ms':>12s} {'ravit ms':>9s} {'ratio':>6s} {'min–max':>12s} {'max|Δlogit|':>12s} "
          f"{'page faults/forward (released, ravit)':>38s}")
    for row in rows:
        print(f"{row['model']:24s} {statistics.median(row['official_median_ms']):12.1f} "
              f"{statistics.median(row['ravit_median_ms']):9.1f} {row['ratio_median']:6.2f} "
              f"{row['ratio_min']:5.2f}–{row['ratio_max']:<5.2f} {row['max_abs_logit_diff']:12.2e} "
              f"{row['official_faults_per_forward']:>27.0f}, {row['ravit_faults_per_forward']:.0f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fan_tiny_12_p16_224", "fan_small_12_p16_224"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (the matmul reference is then bf16 too)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(model) (needs a C++ compiler)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; use 1 on a shared, busy machine)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--breakdown", action="store_true", help="CPU: time per kernel kind and the bound it implies")
    parser.add_argument("--official-src", help="compare with the released FAN code in this folder (see above)")
    parser.add_argument("--official-timm", default="~/.cache/ravit/timm-0.5.4",
                        help="where timm 0.5.4 for the released code is (installed there if missing)")
    parser.add_argument("--pairs", type=int, default=9, help="alternating released/ravit process pairs")
    args = parser.parse_args()
    if args.official_src:
        rows = compare_released(args)
        if args.json:
            write_json(args.json, dict(device=args.device, amp=args.amp, batch_size=args.batch_size,
                                       img_size=args.img_size, iters=args.iters, pairs=args.pairs, models=rows))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.amp else torch.float32
    peak = matmul_gmacs_per_s(device, dtype, args.matmul_size, args.iters)
    rows = []
    for name in args.models:
        for compiled in (False, True) if args.compile else (False,):
            row = bench_model(name, device, args.batch_size, args.img_size, args.iters, args.amp, compiled)
            rows.append(dict(row, model=name + (" (compiled)" if compiled else ""), compiled=compiled))
    peak = max(peak, matmul_gmacs_per_s(device, dtype, args.matmul_size, args.iters))  # best of before/after
    print(f"device {device}, {torch.get_num_threads()} threads, {'bf16 autocast' if args.amp else 'fp32'}, "
          f"batch {args.batch_size} at {args.img_size}; dense {args.matmul_size}² matmul: {peak:.1f} GMAC/s")
    print(f"{'model':34s} {'GMACs/img':>10s} {'img/s':>8s} {'ms/batch':>9s} {'GMAC/s':>8s} {'util':>6s}")
    for row in rows:
        row["utilisation"] = row["gmacs_per_s"] / peak
        print(f"{row['model']:34s} {row['gmacs_per_image']:10.3f} {row['images_per_s']:8.1f} "
              f"{row['ms_per_batch']:9.1f} {row['gmacs_per_s']:8.1f} {row['utilisation']:6.1%}")
    bounds = []
    if args.breakdown and device.type == "cpu":
        print("\nprofiled self time per forward (the profiler adds a few µs per op, so 'other' reads high):")
        for name in args.models:
            b = breakdown(name, args.batch_size, args.img_size, peak, args.iters)
            bounds.append(b)
            parts = b["seconds_per_batch"].items()
            shares = ", ".join(f"{k} {v * 1e3:.1f} ms ({v / b['total']:.0%})" for k, v in parts)
            print(f"{name}: {shares}; utilisation bound if 'other' were free: {b['bound_utilisation']:.1%}")
    if args.json:
        write_json(args.json, dict(device=str(device), threads=torch.get_num_threads(), amp=args.amp,
                                   batch_size=args.batch_size, img_size=args.img_size, matmul_gmacs_per_s=peak,
                                   models=rows, breakdown=bounds))


if __name__ == "__main__":
    main()
