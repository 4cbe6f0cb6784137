"""Shared test fixtures: the parity-fixture folder and tiny build settings per model family."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

PARITY_DIR = Path(os.environ.get("RAVIT_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared/fixtures/parity"))
# Under CI the parity fixtures are part of the contract: a missing folder fails the run instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_parity_fixtures() -> None:
    """Skip (plain clone) or fail (CI=true) a test that needs ``../shared/fixtures/parity``."""
    message = f"parity fixtures not found at {PARITY_DIR} (set RAVIT_PARITY_DIR)"
    if IN_CI:
        pytest.fail(message + "; CI=true requires them", pytrace=False)
    pytest.skip(message)

# Overrides that make each family's registered models small enough for CPU tests (keyed by the model's module).
TINY_KWARGS = {
    "ravit.models.fan": dict(embed_dim=32, depth=2, num_heads=2, channel_dims=[32, 32]),
    "ravit.models.fan_hybrid": dict(embed_dim=32, depth=2, num_heads=2, channel_dims=[32, 32], convnext_depths=(1, 1),
                                    convnext_dims=(16, 32)),
    "ravit.models.fan_swin": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2)),
}


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "manifest.json").is_file():
        missing_parity_fixtures()
    return PARITY_DIR


@pytest.fixture(scope="session")
def parity_manifest(parity_dir: Path) -> dict:
    return json.loads((parity_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def cpu_kernels_built() -> None:
    """ravit's CPU kernels, built for this machine (``scripts/setup.sh`` already did: then a no-op) and loaded; skips
    where this machine cannot build them (no AVX2/AVX-512, no C++ compiler)."""
    from ravit.layers import cpu_kernels

    try:
        cpu_kernels.build()
    except cpu_kernels.KernelBuildError as err:
        pytest.skip(f"ravit's CPU kernels cannot be built here: {err}")
    previous = os.environ.pop("RAVIT_CPU_KERNELS", None)
    try:
        assert cpu_kernels.available()
    finally:
        if previous is not None:
            os.environ["RAVIT_CPU_KERNELS"] = previous


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second thread costs more than it gains on a busy CI box."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
