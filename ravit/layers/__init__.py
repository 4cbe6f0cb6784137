"""Building blocks of FAN (arXiv 2204.12451) that timm does not have, one concept per file, re-exported flat.

XCiT's Fourier positional encoding, convolutional stem (extended here with FAN's p4) and class-attention block come
from ``timm.models.xcit``, the SE of the SE-MLP ablation from timm's EfficientNet blocks.
"""

from .attention_capture import capture_attention, explicit_attention
from .channel_processing import ChannelProcessing, channel_attention_gate
from .conv_patch_embed import ConvPatchEmbed
from .dwconv import DWConv, map_to_tokens, tokens_to_map
from .mlp import DWConvMlp, squeeze_excite
from .overlap_patch_embed import OverlapPatchEmbed
from .token_mixing import TokenMixing

__all__ = [
    "ChannelProcessing",
    "ConvPatchEmbed",
    "DWConv",
    "DWConvMlp",
    "OverlapPatchEmbed",
    "TokenMixing",
    "capture_attention",
    "channel_attention_gate",
    "explicit_attention",
    "map_to_tokens",
    "squeeze_excite",
    "tokens_to_map",
]
