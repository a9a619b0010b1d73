"""Vision Remember for Hugging Face Transformers.

Importing `vr_hf` registers the classes with the Auto classes, in this process (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`) and for the Hub: `save_pretrained` then writes the `auto_map` and
copies the remote-code files, so the saved folder loads with `trust_remote_code=True` without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import (
    VisionRememberConfig,
    VisionRememberForConditionalGeneration,
    VisionRememberMiniCPMV4_6Config,
    VisionRememberMiniCPMV4_6ForConditionalGeneration,
    VisionRememberMiniCPMV4_6Model,
    VisionRememberModel,
    VisionRememberPreTrainedModel,
    VisionRememberQwen2_5_VLConfig,
    VisionRememberQwen2_5_VLForConditionalGeneration,
    VisionRememberQwen2_5_VLModel,
)
from .modeling.processing_vision_remember import VisionRememberProcessor


AutoConfig.register("vision_remember", VisionRememberConfig)
AutoModel.register(VisionRememberConfig, VisionRememberModel)
AutoModelForImageTextToText.register(VisionRememberConfig, VisionRememberForConditionalGeneration)
AutoProcessor.register(VisionRememberConfig, VisionRememberProcessor)

VisionRememberConfig.register_for_auto_class("AutoConfig")
VisionRememberModel.register_for_auto_class("AutoModel")
VisionRememberForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
VisionRememberProcessor.register_for_auto_class("AutoProcessor")

# Native VLMs with Vision Remember grafted on (`vr_hf.conversion.graft`)
GRAFTED_CLASSES = (
    (VisionRememberQwen2_5_VLConfig, VisionRememberQwen2_5_VLModel, VisionRememberQwen2_5_VLForConditionalGeneration),
    (
        VisionRememberMiniCPMV4_6Config,
        VisionRememberMiniCPMV4_6Model,
        VisionRememberMiniCPMV4_6ForConditionalGeneration,
    ),
)
# (config class, head class) of every kind of vr-hf checkpoint
CHECKPOINT_CLASSES = ((VisionRememberConfig, VisionRememberForConditionalGeneration),) + tuple(
    (config, head) for config, _, head in GRAFTED_CLASSES
)
for _config, _model, _head in GRAFTED_CLASSES:
    AutoConfig.register(_config.model_type, _config)
    AutoModel.register(_config, _model)
    AutoModelForImageTextToText.register(_config, _head)
    _config.register_for_auto_class("AutoConfig")
    _model.register_for_auto_class("AutoModel")
    _head.register_for_auto_class("AutoModelForImageTextToText")

__all__ = [
    "VisionRememberConfig",
    "VisionRememberMiniCPMV4_6Config",
    "VisionRememberMiniCPMV4_6ForConditionalGeneration",
    "VisionRememberMiniCPMV4_6Model",
    "VisionRememberQwen2_5_VLConfig",
    "VisionRememberQwen2_5_VLForConditionalGeneration",
    "VisionRememberQwen2_5_VLModel",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
    "VisionRememberProcessor",
]
