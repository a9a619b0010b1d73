"""The remote-code files every exported checkpoint carries, importable as `vr_hf.modeling`."""

from .configuration_vision_remember import VisionRememberConfig
from .configuration_vision_remember_minicpmv4_6 import VisionRememberMiniCPMV4_6Config
from .configuration_vision_remember_qwen2_5_vl import VisionRememberQwen2_5_VLConfig
from .modeling_vision_remember import (
    VisionRememberForConditionalGeneration,
    VisionRememberModel,
    VisionRememberPreTrainedModel,
)
from .modeling_vision_remember_minicpmv4_6 import (
    VisionRememberMiniCPMV4_6ForConditionalGeneration,
    VisionRememberMiniCPMV4_6Model,
)
from .modeling_vision_remember_qwen2_5_vl import (
    VisionRememberQwen2_5_VLForConditionalGeneration,
    VisionRememberQwen2_5_VLModel,
)


__all__ = [
    "VisionRememberConfig",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
    "VisionRememberMiniCPMV4_6Config",
    "VisionRememberMiniCPMV4_6ForConditionalGeneration",
    "VisionRememberMiniCPMV4_6Model",
    "VisionRememberQwen2_5_VLConfig",
    "VisionRememberQwen2_5_VLForConditionalGeneration",
    "VisionRememberQwen2_5_VLModel",
]
