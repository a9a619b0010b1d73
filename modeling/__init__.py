"""The remote-code files every exported checkpoint carries, importable as `vr_hf.modeling` (this file itself is never
copied into a checkpoint).

Importing it registers the classes with the Auto classes, in this process (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`) and for the Hub: `save_pretrained` then writes the `auto_map` and
copies the remote-code files, so the saved folder loads with `trust_remote_code=True` without vr-hf.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

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
from .processing_vision_remember import VisionRememberProcessor


# (config, base model, head) of every kind of vr-hf checkpoint: LLaVA-VR, then the native VLMs with Vision Remember
# grafted on (`vr_hf.conversion.graft`)
CHECKPOINT_CLASSES = (
    (VisionRememberConfig, VisionRememberModel, VisionRememberForConditionalGeneration),
    (VisionRememberQwen2_5_VLConfig, VisionRememberQwen2_5_VLModel, VisionRememberQwen2_5_VLForConditionalGeneration),
    (
        VisionRememberMiniCPMV4_6Config,
        VisionRememberMiniCPMV4_6Model,
        VisionRememberMiniCPMV4_6ForConditionalGeneration,
    ),
)

for _config, _model, _head in CHECKPOINT_CLASSES:
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _head, exist_ok=True)
    _config.register_for_auto_class("AutoConfig")
    _model.register_for_auto_class("AutoModel")
    _head.register_for_auto_class("AutoModelForImageTextToText")
AutoProcessor.register(VisionRememberConfig, VisionRememberProcessor, exist_ok=True)
VisionRememberProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CHECKPOINT_CLASSES",
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
]
