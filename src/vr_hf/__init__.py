"""Vision Remember for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .modeling import (
    VisionRememberConfig,
    VisionRememberForConditionalGeneration,
    VisionRememberModel,
    VisionRememberPreTrainedModel,
)


AutoConfig.register("vision_remember", VisionRememberConfig)
AutoModel.register(VisionRememberConfig, VisionRememberModel)
AutoModelForImageTextToText.register(VisionRememberConfig, VisionRememberForConditionalGeneration)

__all__ = [
    "VisionRememberConfig",
    "VisionRememberForConditionalGeneration",
    "VisionRememberModel",
    "VisionRememberPreTrainedModel",
]
