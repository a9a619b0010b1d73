"""The remote-code files every exported checkpoint carries, importable as `vr_hf.modeling`."""

from .configuration_vision_remember import VisionRememberConfig
from .modeling_vision_remember import (
    VisionRememberForConditionalGeneration,
    VisionRememberModel,
    VisionRememberPreTrainedModel,
)


__all__ = [
    "VisionRememberConfig",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
]
