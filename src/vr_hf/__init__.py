"""Vision Remember for Hugging Face Transformers.

Importing `vr_hf` registers the classes with the Auto classes, in this process (`AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText`, `AutoProcessor`) and for the Hub: `save_pretrained` then writes the `auto_map` and
copies the remote-code files, so the saved folder loads with `trust_remote_code=True` without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import (
    VisionRememberConfig,
    VisionRememberForConditionalGeneration,
    VisionRememberModel,
    VisionRememberPreTrainedModel,
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

__all__ = [
    "VisionRememberConfig",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
    "VisionRememberProcessor",
]
