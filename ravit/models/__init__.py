"""Model families, registered in timm's registry on import (``timm.create_model('fan_tiny_12_p16_224')``)."""

from . import fan, fan_hybrid, fan_swin, zoo  # zoo last: its names build on the families' architectures
from .fan import FAN, FANBlock

__all__ = ["FAN", "FANBlock", "fan", "fan_hybrid", "fan_swin", "zoo"]
