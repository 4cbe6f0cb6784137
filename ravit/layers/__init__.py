"""Building blocks of FAN (arXiv 2204.12451), one concept per file, re-exported flat."""

from .channel_processing import ChannelProcessing, channel_attention_gate
from .class_attention import ClassAttention, ClassAttentionBlock
from .conv_patch_embed import ConvPatchEmbed, conv_bn, fused_conv_bn
from .dwconv import DWConv, map_to_tokens, tokens_to_map
from .mlp import DWConvMlp, SEMlp, SqueezeExcite
from .overlap_patch_embed import OverlapPatchEmbed
from .pos_embed import PositionalEncodingFourier, fourier_features
from .token_mixing import TokenMixing, explicit_attention

__all__ = [
    "ChannelProcessing",
    "ClassAttention",
    "ClassAttentionBlock",
    "ConvPatchEmbed",
    "DWConv",
    "DWConvMlp",
    "OverlapPatchEmbed",
    "PositionalEncodingFourier",
    "SEMlp",
    "SqueezeExcite",
    "TokenMixing",
    "channel_attention_gate",
    "conv_bn",
    "explicit_attention",
    "fourier_features",
    "fused_conv_bn",
    "map_to_tokens",
    "tokens_to_map",
]
