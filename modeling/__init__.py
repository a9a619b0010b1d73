"""The remote-code files every exported checkpoint carries, importable as `vr_hf.modeling` (this file itself is never
copied into a checkpoint).

Importing it registers every kind of vr-hf checkpoint with the Auto classes (`vr_hf.backbones`), in this process and
for the Hub: `save_pretrained` then writes the `auto_map` and copies the remote-code files, so the saved folder loads
with `trust_remote_code=True` without vr-hf.
"""

from .. import backbones  # noqa: F401  (the registry imports the classes below and registers them)
from .configuration_llava_vr import VisionRememberConfig
from .configuration_vision_remember_minicpmv4_6 import VisionRememberMiniCPMV4_6Config
from .configuration_vision_remember_qwen2_5_vl import VisionRememberQwen2_5_VLConfig
from .configuration_vision_remember_qwen3_vl import VisionRememberQwen3VLConfig
from .modeling_llava_vr import (
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
from .modeling_vision_remember_qwen3_vl import (
    VisionRememberQwen3VLForConditionalGeneration,
    VisionRememberQwen3VLModel,
)
from .processing_llava_vr import VisionRememberProcessor


__all__ = [
    "VisionRememberConfig",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
    "VisionRememberMiniCPMV4_6Config",
    "VisionRememberMiniCPMV4_6ForConditionalGeneration",
    "VisionRememberMiniCPMV4_6Model",
    "VisionRememberProcessor",
    "VisionRememberQwen2_5_VLConfig",
    "VisionRememberQwen2_5_VLForConditionalGeneration",
    "VisionRememberQwen2_5_VLModel",
    "VisionRememberQwen3VLConfig",
    "VisionRememberQwen3VLForConditionalGeneration",
    "VisionRememberQwen3VLModel",
]
