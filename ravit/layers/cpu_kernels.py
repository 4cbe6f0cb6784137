"""ravit's own fp32 CPU kernels: FAN inference (``cpu_kernels.cpp``) and ATS's one-image selection
(``ravit/ats/cpu_select.cpp``, see :mod:`ravit.ats.cpu_select`), one library, built once, loaded when present.

Two parts of a FAN block cost far more on a CPU in eager PyTorch than their arithmetic (FAN, arXiv 2204.12451):

- the MLP's token mixer (Sec. 3), 3×3 depthwise conv → GELU → BatchNorm → 3×3 depthwise conv. oneDNN fuses the GELU
  into the first conv but has no post-op for a BatchNorm *after* it, and the BatchNorm cannot be folded into the second
  conv (that conv zero-pads BatchNorm's output), so it runs as three passes over the block's widest tensor;
- the channel-attention gate (Sec. 3.2): two softmaxes over the token axis of (B, N, C) tensors, a mean and a batched
  product, five ops for a (B, C) result.

``ravit::dwconv_chain`` runs the chain in one pass per (image, channel block), the intermediate map staying in the
core's cache; ``ravit::channel_gate`` computes the gate per (image, head) in one op. Neither torch, timm nor oneDNN
has such kernels, hence these ~250 lines of C++ on ATen's vector types (``ravit::topk_select`` and
``ravit::fuse_nearest``, ATS's, are in the second source). Measured on FAN-T at 224, fp32, 2 threads,
12 alternating rounds in one process (README): 25.1 → 20.6 ms at batch 1, 123 → 113 ms at batch 8; outputs within
1e-6.

They are compiled for this machine's CPU (AVX-512 or AVX2, as ``torch.backends.cpu.get_cpu_capability()`` reports)
and this torch by ``ravit kernels build`` (``scripts/setup.sh`` runs it), with the C++ compiler and torch's own
headers, into a cache folder keyed by the source, torch version and capability. ``available()`` loads the library
the first time it is asked and finds it; without it (no compiler, another CPU, ``RAVIT_CPU_KERNELS=0``) FAN runs the
oneDNN path of :mod:`ravit.layers.cpu_inference` and ATS its torch ops, same outputs within fp32 rounding. Nothing is
compiled on import or inside a forward.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["KernelBuildError", "available", "build", "channel_gate", "dwconv_chain", "library_path", "supports_chain"]

# FAN's kernels and ATS's one-image selection (ravit/ats/cpu_select.py), one library
SOURCES = (Path(__file__).with_name("cpu_kernels.cpp"), Path(__file__).parents[1] / "ats" / "cpu_select.cpp")

# Instruction sets by torch's name for the CPU's capability, and the macros that select ATen's vector types for them.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
LANES = {"AVX512": 16, "AVX2": 8}


class KernelBuildError(RuntimeError):
    """The kernels cannot be built here: no supported CPU capability, no C++ compiler, or the compiler failed."""


def capability() -> str | None:
    """The instruction set the kernels are built for on this machine ("AVX512", "AVX2"), or None if unsupported."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _ISA_FLAGS else None


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def _command(cap: str, output: Path) -> list[str]:
    root = Path(torch.__file__).parent
    return [
        _compiler(), "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", *_ISA_FLAGS[cap],
        f"-DCPU_CAPABILITY={cap}", f"-DCPU_CAPABILITY_{cap}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
        f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *map(str, SOURCES), "-o", str(output), f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu",
    ]


def _cache_dir() -> Path:
    if os.environ.get("RAVIT_KERNEL_DIR"):
        return Path(os.environ["RAVIT_KERNEL_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ravit" / "kernels"


@functools.cache
def library_path() -> Path | None:
    """Where this machine's build lives: named by a hash of the source, the compile command and torch's version
    (another torch or CPU gets its own file); None when the CPU capability is unsupported. Fixed per process."""
    cap = capability()
    if cap is None:
        return None
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES))
    key.update(" ".join([torch.__version__, *_command(cap, Path("out"))]).encode())
    return _cache_dir() / f"ravit_cpu_kernels-{cap.lower()}-{key.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compiles the kernels for this machine (about 20 s) unless already built; returns the library's path.

    The library is written to a temporary file in the cache folder and renamed into place only once complete, so a
    failed or interrupted build leaves nothing that :func:`available` would load."""
    path = library_path()
    if path is None:
        raise KernelBuildError(f"no kernels for this CPU: torch reports capability "
                               f"{torch.backends.cpu.get_cpu_capability()!r}, the kernels need AVX512 or AVX2")
    if path.is_file() and not force:
        return path
    compiler = _compiler()
    if shutil.which(compiler) is None:
        raise KernelBuildError(f"no C++ compiler {compiler!r} on PATH (set CXX to one)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        result = subprocess.run(_command(capability(), partial), capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelBuildError(f"{compiler} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        os.replace(partial, path)
    return path


# The library loaded into this process (torch.ops.ravit), once: a namespace can be registered only once per process.
_LOADED: list[Path] = []


def available() -> bool:
    """Whether ``torch.ops.ravit`` kernels can run: built for this machine and not switched off with
    ``RAVIT_CPU_KERNELS=0`` (read on every call, so a benchmark can compare both paths in one process). Loads the
    library the first time it finds it built."""
    if os.environ.get("RAVIT_CPU_KERNELS", "1") == "0":
        return False
    if _LOADED:
        return True
    path = library_path()
    if path is None or not path.is_file():
        return False
    torch.ops.load_library(str(path))
    _LOADED.append(path)
    return True


def supports_chain(x: torch.Tensor, conv1: nn.Conv2d, conv2: nn.Conv2d) -> bool:
    """Whether :func:`dwconv_chain` computes this chain: fp32 outside autocast, 3×3 depthwise stride-1 convs padded by
    1, and a channel count that fills whole vectors."""
    cap = capability()
    return (x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu") and cap is not None
            and x.shape[-1] % LANES[cap] == 0
            and all(c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.dilation == (1, 1)
                    and c.groups == c.in_channels == c.out_channels == x.shape[-1] and c.weight.is_contiguous()
                    for c in (conv1, conv2)))


def dwconv_chain(x: torch.Tensor, hw: tuple[int, int], conv1: nn.Conv2d, bn: nn.BatchNorm2d, conv2: nn.Conv2d,
                 out_scale: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    """conv2(BN(GELU(conv1(x)))) · out_scale [+ residual] on (B, N, C) tokens of an (H, W) grid, eval BatchNorm.

    With a contiguous fp32 ``residual`` the result is added into its memory and ``residual`` returned (it may be
    ``x`` itself: the kernel reads each channel block of x before writing it); otherwise into a fresh (B, N, C)."""
    B, _, C = x.shape
    H, W = hw
    x = x.contiguous()
    accumulate = residual is not None and residual.is_contiguous() and residual.dtype == torch.float32
    out = residual if accumulate else torch.empty_like(x)
    torch.ops.ravit.dwconv_chain(x.view(B, H, W, C), conv1.weight, conv1.bias, bn.weight, bn.bias, bn.running_mean,
                                 bn.running_var, bn.eps, conv2.weight, conv2.bias, out_scale, out.view(B, H, W, C),
                                 accumulate)
    return out if accumulate or residual is None else out.add_(residual)


def channel_gate(q: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor,
                 out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`~ravit.layers.channel_processing.channel_attention_gate` (times ``out_scale``) as one op: q, k (B, N, C)
    fp32, temperature (h, 1, 1) -> (B, 1, C)."""
    gate = q.new_empty(q.shape[0], 1, q.shape[2])
    torch.ops.ravit.channel_gate(q.contiguous(), k.contiguous(), temperature.reshape(-1), out_scale, gate)
    return gate
