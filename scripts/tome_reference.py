"""Record what the released ToMe code (facebookresearch/ToMe, ``tome.patch.timm``) computes, for ravit's parity tests.

Usage::

    .venv/bin/python scripts/tome_reference.py --tome-src /path/to/ToMe --out tests/fixtures/tome_released.json

The released package is imported from ``--tome-src`` (put on ``sys.path``; nothing of it is copied). Two cases:

- ``zoo``: ravit's shipped ``fmnist_deit_p4`` on the first 1000 Fashion-MNIST test images (the zoo's eval pipeline),
  for each r: top-1 (percent), the 1000 predictions and the logits of the first 16 images;
- ``random_vits``: small timm ViTs rebuilt from a seed and a spec (class token, global average pooling, DeiT
  distilled) on a seeded batch, for each r: logits.

Only weight-independent facts are stored: the zoo weights ship with ravit, and the tests rebuild the random ViTs from
the recorded spec, seeds and weight std with the recipe of ``build_random_vit`` (also written out in the JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

ZOO_MODEL = "fmnist_deit_p4"
ZOO_IMAGES = 1000
ZOO_LOGITS = 16
ZOO_R = [0, 2, 4, 6, 8, 10, 12]
RANDOM_R = [0, 1, 3, 8, 100]
RANDOM_SEED = 0
INPUT_SEED = 1
NUM_INPUTS = 8
RANDOM_SPEC = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=5)
# Each random case: extra VisionTransformer kwargs and whether it is timm's distilled DeiT.
RANDOM_CASES = {
    "class_token": dict(kwargs={}, distilled=False),
    "global_avg_pool": dict(kwargs=dict(class_token=False, global_pool="avg"), distilled=False),
    "distilled": dict(kwargs={}, distilled=True),
}
WEIGHT_STD = 0.2  # random ViTs: matrices and tokens redrawn at this std so that merging changes the logits visibly


def build_random_vit(case: dict, spec: dict = RANDOM_SPEC, seed: int = RANDOM_SEED,
                     std: float = WEIGHT_STD) -> torch.nn.Module:
    """One random case's ViT: timm's init under ``seed``, then every matrix, token and position embedding redrawn
    from N(0, std) in ``named_parameters`` order."""
    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if case["distilled"] else VisionTransformer
    model = cls(**spec, **case["kwargs"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 or "token" in name or "pos" in name:
                p.normal_(0, std)
    return model.eval()


def random_inputs(spec: dict = RANDOM_SPEC, n: int = NUM_INPUTS, seed: int = INPUT_SEED) -> torch.Tensor:
    """(n, 3, H, W) standard-normal images from ``seed``."""
    return torch.randn(n, 3, spec["img_size"], spec["img_size"], generator=torch.Generator().manual_seed(seed))


def zoo_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``ZOO_IMAGES`` Fashion-MNIST test images through the zoo's eval pipeline: (N, 1, 28, 28), (N,)."""
    from ravit.models.zoo import load_manifest
    from ravit.train.export import eval_loader

    entry = load_manifest()["models"][ZOO_MODEL]
    loader = eval_loader(entry["dataset"], entry["input_size"][0], entry["input_size"][-1], limit=ZOO_IMAGES)
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def _released_logits(model: torch.nn.Module, r: int, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    import tome

    tome.patch.timm(model)
    model.r = r
    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, len(images), batch)])


def _source_digest(tome_src: Path) -> str:
    """sha256 over the released package's Python files (the checkout has no git metadata)."""
    digest = hashlib.sha256()
    for path in sorted((tome_src / "tome").rglob("*.py")):
        digest.update(str(path.relative_to(tome_src)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _setup_version(tome_src: Path) -> str | None:
    text = (tome_src / "setup.py").read_text() if (tome_src / "setup.py").is_file() else ""
    for line in text.splitlines():
        if line.strip().startswith("version="):
            return line.split("=", 1)[1].strip().strip(",").strip("\"'")
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tome-src", type=Path, required=True, help="checkout of facebookresearch/ToMe")
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/tome_released.json"))
    parser.add_argument("--commit", help="upstream commit whose tome/ package the checkout matches (recorded as given)")
    args = parser.parse_args(argv)
    if not (args.tome_src / "tome" / "patch" / "timm.py").is_file():
        parser.error(f"{args.tome_src} is not a ToMe checkout (no tome/patch/timm.py)")
    sys.path.insert(0, str(args.tome_src.resolve()))
    import ravit

    images, labels = zoo_images()
    zoo = {"model": ZOO_MODEL, "images": ZOO_IMAGES, "split": "test", "runs": {}}
    for r in ZOO_R:
        logits = _released_logits(ravit.create_model(ZOO_MODEL, pretrained=True).eval(), r, images)
        preds = logits.argmax(dim=1)
        zoo["runs"][str(r)] = {
            "top1": 100.0 * float(preds.eq(labels).float().mean()),
            "predictions": preds.tolist(),
            "logits": logits[:ZOO_LOGITS].tolist(),
        }
        print(f"zoo r={r}: top-1 {zoo['runs'][str(r)]['top1']:.2f}")

    x = random_inputs()
    randoms = {}
    for name, case in RANDOM_CASES.items():
        runs = {str(r): _released_logits(build_random_vit(case), r, x).tolist() for r in RANDOM_R}
        randoms[name] = {**case, "runs": runs}

    fixture = {
        "released": {
            "repository": "https://github.com/facebookresearch/ToMe",
            "version": _setup_version(args.tome_src),
            "commit": args.commit,
            "source_sha256": _source_digest(args.tome_src),
            "call": "tome.patch.timm(model); model.r = r (prop_attn=True, trace_source=False)",
        },
        "torch": torch.__version__,
        "timm": timm.__version__,
        "zoo": zoo,
        "random_vits": {
            "recipe": "torch.manual_seed(seed); model = VisionTransformer(**spec, **kwargs) (timm.models.deit."
                      "VisionTransformerDistilled when distilled); then every parameter with ndim > 1 or 'token' or "
                      "'pos' in its name .normal_(0, weight_std) in named_parameters order; model.eval(); inputs: "
                      "torch.randn(num_inputs, 3, img_size, img_size, generator=torch.Generator().manual_seed("
                      "input_seed))",
            "spec": RANDOM_SPEC, "seed": RANDOM_SEED, "weight_std": WEIGHT_STD, "input_seed": INPUT_SEED,
            "num_inputs": NUM_INPUTS, "cases": randoms,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
