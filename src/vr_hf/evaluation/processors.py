"""The processor that builds a checkpoint's inputs, for every kind of vr-hf checkpoint.

LLaVA-VR checkpoints carry their own `VisionRememberProcessor` (remote code); grafted Qwen2.5-VL and MiniCPM-V 4.6
checkpoints carry the source model's processor files. `AutoProcessor` loads either. The stock processors of the
grafts also hold a video processor, which needs torchvision: where torchvision is missing, the stock processor class
is built with a stand-in for its video part, so images and text still go through its own code (with the PIL image
processor Transformers falls back to), and only video inputs are refused.
"""

from transformers import CONFIG_MAPPING, AutoImageProcessor, AutoProcessor, AutoTokenizer, PreTrainedConfig
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available


class NoVideoProcessor:
    """Takes the place of a stock processor's video processor where torchvision is missing."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None  # settings that only the video code reads

    def __call__(self, *args, **kwargs):
        raise RuntimeError("Video inputs need torchvision, which is not installed: pip install torchvision.")


def without_video(processor_class: type) -> type:
    """`processor_class`, loading and accepting `NoVideoProcessor` for its video processor."""

    class ImageProcessorOnly(processor_class):
        @classmethod
        def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
            parts = {
                "image_processor": AutoImageProcessor.from_pretrained(pretrained_model_name_or_path),
                "tokenizer": AutoTokenizer.from_pretrained(pretrained_model_name_or_path),
                "video_processor": NoVideoProcessor(),
            }
            return [parts[name] for name in cls.get_attributes()]

        def check_argument_for_proper_class(self, argument_name, argument):
            if isinstance(argument, NoVideoProcessor):
                return NoVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

        def to_dict(self):
            return {key: value for key, value in super().to_dict().items() if not isinstance(value, NoVideoProcessor)}

    ImageProcessorOnly.__name__ = ImageProcessorOnly.__qualname__ = processor_class.__name__
    return ImageProcessorOnly


def load_processor(pretrained: str, config: PreTrainedConfig):
    """The processor of the checkpoint in `pretrained`, whose config is `config`."""
    backbone = getattr(config, "backbone_model_type", None)  # set by grafted configs only
    if backbone is None or is_torchvision_available():
        return AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
    return without_video(PROCESSOR_MAPPING[CONFIG_MAPPING[backbone]]).from_pretrained(pretrained)
