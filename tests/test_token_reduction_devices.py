"""ATS and ToMe on every device this machine has (CPU always, CUDA when present): the ragged padded executor with
its key-masked attention, the static Top-K modes and their batch-1 route, ToMe, and ATS on FAN must give on the
device the kept tokens and logits of the CPU reference, stay batch-independent there, and keep top-1 under bf16
autocast (issue 10 §6: the padded attention had never run on a GPU). On a machine without CUDA only the CPU cases
run; ``benchmarks/gpu_checks.sh`` runs this file on a GPU machine."""

from __future__ import annotations

import functools

import pytest
import torch
from ats_helpers import peaky_vit
from test_ats_fan import _fan_vit
from test_ats_modes import same_kept

import ravit
import ravit.ats.block as ats_block
import ravit.ats.patch as ats_patch
from ravit.ats import apply_ats, trace
from ravit.data.fashion_mnist import find_fashion_mnist
from ravit.errors import MissingFileError
from ravit.tome import apply_tome

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

# One constructor per path of the executor: the paper's adaptive inverse transform (ragged batches, padded
# key-masked attention), a ratio budget, static Top-K (one batched call), static fused Top-K with the redundancy
# discount (the mode that leads ToMe), and ToMe itself.
MODES = {
    "ats-adaptive": lambda m: apply_ats(m, blocks=range(1, len(m.blocks)), budget=None),
    "ats-ratio": lambda m: apply_ats(m, blocks=range(1, len(m.blocks)), budget=0.6),
    "topk-static": lambda m: apply_ats(m, blocks=range(1, len(m.blocks)), budget=20, sampler="topk", static=True),
    "topk-fused-r6": lambda m: apply_ats(m, blocks=range(len(m.blocks)), budget=6, sampler="topk", schedule="linear",
                                         fuse="nearest", static=True, redundancy=6.0),
    "tome": lambda m: apply_tome(m, r=6),
}


@pytest.fixture(autouse=True)
def _exact_cuda_matmuls():
    """fp32 on the GPU as on the CPU: no TF32 in cuDNN convolutions or cuBLAS matmuls (both would cost ~1e-3)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _images(n: int = 6) -> torch.Tensor:
    # contrasts from 0.5 to 4: peaked and flat attention in one batch, so adaptive counts differ per image
    scale = torch.linspace(0.5, 4.0, n)[:, None, None, None]
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * scale


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(kept tokens per image and ATS block, or None for ToMe, whose merges every image shares; logits on CPU)."""
    if ravit.ats.has_ats(model):
        out = trace(model, x, count_gmacs=False)
        return out.kept_tokens.cpu(), out.logits.cpu()
    return None, model(x).cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_device_matches_cpu_and_is_batch_independent(device, mode):
    model = MODES[mode](peaky_vit())
    x = _images()
    with torch.inference_mode():
        kept_cpu, logits_cpu = _run(model, x)  # the reference: CPU, fp32
        model.to(device)
        kept, logits = _run(model, x.to(device))
        alone = [_run(model, x[i : i + 1].to(device)) for i in range(len(x))]
    if mode == "ats-adaptive":  # the ragged case: images keep different numbers of tokens
        assert len(set(kept_cpu[:, -1].tolist())) > 1
    if kept is not None:
        assert torch.equal(kept, kept_cpu)
    torch.testing.assert_close(logits, logits_cpu, atol=1e-4, rtol=1e-4)
    for i, (kept_one, logits_one) in enumerate(alone):
        if kept is not None:
            assert torch.equal(kept_one[0], kept[i])
        torch.testing.assert_close(logits_one[0], logits[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["ats-adaptive", "ats-ratio"])
def test_padded_ragged_path_matches_image_by_image(mode, monkeypatch):
    """The path a GPU takes for ragged batches (scores and attention padded to the widest image, padding keys
    masked), forced on the CPU: the same kept tokens as the image-by-image path, logits within 1e-5."""
    model = MODES[mode](peaky_vit())
    x = _images()
    with torch.inference_mode():
        exact = trace(model, x, count_gmacs=False)
        monkeypatch.setattr(ats_block, "_scores", functools.partial(ats_block._scores, padded=True))
        monkeypatch.setattr(ats_block, "_attention", functools.partial(ats_block._attention, padded=True))
        padded = trace(model, x, count_gmacs=False)
    assert len(set(exact.kept_tokens[:, -1].tolist())) > 1  # ragged
    assert same_kept(padded, exact)
    torch.testing.assert_close(padded.logits, exact.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_one_image_route_matches_the_general_path_on_device(device, monkeypatch):
    model = MODES["topk-fused-r6"](peaky_vit()).to(device)
    x = _images(1).to(device)
    with torch.inference_mode():
        routed = model(x)
        monkeypatch.setattr(ats_patch, "one_image_route", lambda images: False)
        general = model(x)
    torch.testing.assert_close(routed, general, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", ["inverse_transform", "topk"])
def test_ats_on_fan_matches_cpu(device, sampler):
    model = _fan_vit()
    apply_ats(model, blocks=range(1, len(model.blocks)), budget=None if sampler == "inverse_transform" else 0.7,
              sampler=sampler)
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    x = x * torch.tensor([0.5, 1.0, 2.0, 4.0])[:, None, None, None]
    with torch.inference_mode():
        reference = trace(model, x, count_gmacs=False)
        here = trace(model.to(device), x.to(device), count_gmacs=False)
    assert torch.equal(here.kept_tokens.cpu(), reference.kept_tokens)
    torch.testing.assert_close(here.logits.cpu(), reference.logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def fmnist_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        find_fashion_mnist()
    except MissingFileError as err:
        pytest.skip(str(err))
    from ravit.data.datasets import create_dataset
    from ravit.data.model_input import ModelInput

    spec = ModelInput.from_model(ravit.create_model("fmnist_deit_p4", pretrained=True))
    dataset = create_dataset("fashion_mnist", "test", transform=spec.transform())
    images, labels = zip(*(dataset[i] for i in range(1000)), strict=True)
    return torch.stack(images), torch.tensor(labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_bf16_autocast_keeps_accuracy(device, mode, fmnist_test_images):
    """bf16 autocast moves attention scores by ~1e-2, so near-tied tokens can swap (sampling is discontinuous:
    measured on CPU, 91-99% of images keep their fp32 prediction, fewest under inverse transform at a ratio budget),
    but accuracy must not move: top-1 on the first 1000 test images within 2 points of fp32 on the trained zoo ViT
    (the flips measured net +0.2 to +0.6), with finite logits."""
    images, labels = fmnist_test_images
    model = MODES[mode](ravit.create_model("fmnist_deit_p4", pretrained=True).eval()).to(device)
    images, labels = images.to(device), labels.to(device)
    with torch.inference_mode():
        fp32 = model(images)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            bf16 = model(images)
    assert torch.isfinite(bf16).all()
    top1 = [100 * (out.argmax(-1) == labels).float().mean().item() for out in (fp32, bf16)]
    assert abs(top1[1] - top1[0]) <= 2.0, f"{mode} on {device}: top-1 {top1[0]:.1f} in fp32, {top1[1]:.1f} in bf16"
