"""CPU inference path of FAN: BatchNorm folded into the convs, GELU and biases fused, skip connections in place.

FAN (arXiv 2204.12451) Sec. 3 puts convolutions where a plain ViT has none: the patch-embedding stem (conv → BN → GELU,
three times) and the depthwise conv → GELU → BN → depthwise conv inside every block's MLP. In eval mode with autograd
off these are the same function as a chain of oneDNN convolutions with BN folded into the weights and GELU applied as
the convolution's post-op (``torch.ops.mkldnn._convolution_pointwise``, the fused kernel that PyTorch's own inductor
emits for CPU), and the residual additions can reuse buffers that nothing else holds. On a CPU that halves the
elementwise passes over the block's widest tensor and, above all, the large fresh allocations, whose first-touch page
faults cost more than the arithmetic on a 2-core machine (measured: a fresh 4 MB tensor costs about 1 ms of faults,
copying into a warm one 0.07 ms). The linear layers take oneDNN's matmul with the bias (and, for the attention
projection, the skip connection) as post-ops (``torch.ops.mkldnn._linear_pointwise``), where MKL's ``addmm`` first
copies the broadcast bias into its output. Outputs stay within fp32 rounding of the reference path (~1e-6).

timm and torch have no eager fused conv+BN+GELU layer or bias-fused linear, hence these few functions; everything
else runs the reference modules. ``fast_inference`` decides per call: only where no gradient can flow, BatchNorm uses
its running statistics, the input lives on a CPU with oneDNN, and the code is neither scripted, FX-traced, compiled
nor under a dispatch mode such as the FLOP counter (those see the reference path).

A FAN block decides once for all its layers and then calls their weights through these functions, not through its
submodules: at batch 1 the Python between two kernels is a visible share of the time, and a module call with its
checks costs several times more between kernels than in a loop of its own (~1 µs there). Measured on FAN-T's twelve
blocks, one image, 15 alternating rounds: 21.4-21.5 ms against 22.8-23.0 ms through the submodules, the same ops and
outputs. A block whose submodules carry hooks (``hooked``) keeps calling them, so every hook still fires.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from ravit.errors import InvalidArgumentError

__all__ = ["Linear", "bn_scale_shift", "conv_act", "fast_inference", "hooked", "layer_norm", "linear"]


@torch.jit.ignore  # TorchScript never takes this path (callers check torch.jit.is_scripting() first)
def fast_inference(x: torch.Tensor, training: bool) -> bool:
    """Whether the fused CPU path may run for input ``x`` of a module in ``training`` mode."""
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():  # FX symbolic tracing, dynamo, export
        return False
    if is_in_torch_dispatch_mode():  # e.g. FlopCounterMode, which has no formula for oneDNN's fused ops
        return False
    return (not training and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available())


@torch.jit.ignore
def hooked(module: nn.Module) -> bool:
    """Whether a forward hook (the module's, a submodule's or a global one) would fire inside ``module``'s forward."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    # A plain walk over the children dicts: ``module.modules()`` (a generator with a memo set) cost ~80 µs per FAN
    # block here, most of what the fused block path saves.
    stack = [module]
    while stack:
        m = stack.pop()
        if m is not None:  # a child slot set to None
            if m._forward_hooks or m._forward_pre_hooks:
                return True
            stack.extend(m._modules.values())
    return False


@torch.jit.ignore
def layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm(x)`` without the module call (for the fused path, which has checked that nothing hooks ``norm``)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as y = x·scale + shift, each (C,)."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """x, weight, bias in the dtype a conv would run in here: CPU autocast's when it is on, else the input's."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    if dtype != x.dtype or dtype != weight.dtype:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias


@torch.jit.ignore
def conv_act(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, act: str = "none",
             out_scale: torch.Tensor | None = None, accumulate: torch.Tensor | None = None) -> torch.Tensor:
    """act(BN(conv(x))) · out_scale as one oneDNN convolution; x (B, C_in, H, W) -> (B, C_out, H', W') channels-last.

    ``bn`` (applied right after the conv, eval statistics) is folded into the weight and bias; ``act`` is "none" or
    "gelu" (erf GELU, nn.GELU's default); ``out_scale`` (C_out,) multiplies the result (folded too). The weight is
    made channels-last, which makes oneDNN run channels-last (its fast layout) and write a channels-last output; x is
    handed over as it is: token maps already are channels-last, and an NCHW image batch is copied by the op itself.
    For the stem's first conv that only moves the copy into the op, yet it changes the order of the stem's large
    allocations enough that glibc no longer trims and refaults the heap every forward (measured on FAN-T's stem at
    batch 8: 7.6 against 13.2 ms and 0 against ~4,000 page faults per call; level at batch 1), the same output.
    With ``accumulate`` (a channels-last (B, C_out, H', W') map, ``act`` "none") the conv adds its result into that
    tensor in place and returns it.
    """
    weight, bias = conv.weight, conv.bias
    if bn is not None:
        scale, shift = bn_scale_shift(bn)
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = shift if bias is None else bias * scale + shift
    if out_scale is not None:
        weight = weight * out_scale.view(-1, 1, 1, 1)
        bias = bias * out_scale if bias is not None else None
    x, weight, bias = _operands(x, weight, bias)
    weight = weight.contiguous(memory_format=torch.channels_last)
    if accumulate is not None:
        if act != "none" or accumulate.dtype != x.dtype:
            raise InvalidArgumentError(f"conv_act accumulates only without an activation and in the conv's dtype "
                                       f"(got act {act!r}, {accumulate.dtype} into {x.dtype})")
        return torch.ops.mkldnn._convolution_pointwise_.binary(accumulate, x, weight, bias, conv.padding, conv.stride,
                                                                conv.dilation, conv.groups, "add", 1.0, None, [], None)
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, conv.padding, conv.stride, conv.dilation,
                                                   conv.groups, act, [], "none")


# Up to this many multiply-adds MKL's addmm, then an in-place skip addition, beats oneDNN's fused matmul: for a small
# product oneDNN's per-call set-up outweighs the bias copy that addmm makes first. Measured here per call (196 rows):
# 7M MACs 53 vs 69 µs, 29M level (188-198 vs 193-216 µs), 116M oneDNN ahead (775 vs 922 µs for 384 -> 1536); for the
# whole FAN-T at batch 1 (every linear <= 29M), 21-25 alternating rounds in one process: 1.6% faster without the skip
# connection, 4-5% more with the attention projection's.
_MKL_MAX_MACS = 2**25


@torch.jit.ignore
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias) [+ residual]``; x (..., in), residual (..., out) -> (..., out).

    One oneDNN matmul with the bias (and the residual addition) fused, except for a small product (``_MKL_MAX_MACS``)
    and under autocast, where it is ``F.linear`` then an in-place addition: autocast casts each weight once per region
    (its cache), where the oneDNN op would cast it on every call."""
    if torch.is_autocast_enabled("cpu") or x.numel() * weight.shape[0] <= _MKL_MAX_MACS:
        y = F.linear(x, weight, bias)
        return y if residual is None else y.add_(residual)
    if residual is None:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and keys) that runs ``linear`` where ``fast_inference`` allows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (nested: TorchScript then compiles only F.linear)
            if fast_inference(x, self.training):
                return linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
