"""One side of the released-code comparison in ``fan_speed.py --official-src``: time one FAN model's forward in this
process and print the result as one JSON line.

It runs as a script in a subprocess of its own, so each side has its own interpreter, its own timm and its own thread
pool, as a user comparing the two would run them. ``--side official`` imports only the released code (its folder and its
timm 0.5.4 come first on ``PYTHONPATH``; ravit is never imported); ``--side ravit`` imports ravit and builds the model
through ``timm.create_model`` of the current timm. Both load the same weights (official key names) and the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import statistics
import time

import torch


def build(side: str, model: str, weights: str | None) -> torch.nn.Module:
    """The model with ``weights`` (official key names) loaded; without weights, seeded random initialisation."""
    if side == "official":
        importlib.import_module("models")  # the released FAN package registers its models in its timm
        import timm

        net = timm.create_model(model)
        if weights:
            net.load_state_dict(torch.load(weights, map_location="cpu"))
        return net.eval()
    import ravit

    return ravit.create_model(model, checkpoint_path=weights).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["official", "ravit"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--weights", help="state dict under the official key names (torch.save)")
    parser.add_argument("--save-weights", help="official side: save a seeded random state dict here and exit")
    parser.add_argument("--inputs", help="input batch (torch.save of an N×3×H×W tensor)")
    parser.add_argument("--logits", help="save the logits of the input batch here (to compare the two sides)")
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.save_weights:
        torch.save(build(args.side, args.model, None).state_dict(), args.save_weights)
        return

    device = torch.device(args.device)
    model = build(args.side, args.model, args.weights).to(device)
    images = torch.load(args.inputs).to(device)  # (B, 3, H, W)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.amp else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for i in range(args.warmup + args.iters):
            if i == args.warmup:  # minor page faults: first touches of memory the allocator handed back to the OS
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            logits = model(images)  # (B, num_classes)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.iters
    if args.logits:
        torch.save(logits.float().cpu(), args.logits)
    kernels = None
    if args.side == "ravit":  # whether ravit's own CPU kernels ran (built, not switched off by RAVIT_CPU_KERNELS=0)
        from ravit.layers import cpu_kernels

        kernels = device.type == "cpu" and not args.amp and cpu_kernels.available()
    print(json.dumps(dict(side=args.side, model=args.model, median_s=statistics.median(times), times_s=times,
                          minor_faults_per_forward=faults, cpu_kernels=kernels,
                          threads=torch.get_num_threads(), torch=torch.__version__,
                          timm=importlib.import_module("timm").__version__)))


if __name__ == "__main__":
    main()
