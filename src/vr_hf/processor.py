"""Processors: build a `VisionRememberProcessor` that matches a `VisionRememberConfig`, and load the processor of any
vr-hf checkpoint, the one way every entry point (recipes, evaluation, serving, the demo) loads it.

LLaVA-VR checkpoints carry their own `VisionRememberProcessor` (remote code); grafted checkpoints carry the source
model's processor files. The stock processors of the grafts also hold a video processor, which needs torchvision:
where torchvision is missing, the stock processor class is built with a stand-in for its video part, so images and
text still go through its own code (with the PIL image processor Transformers falls back to), and only video inputs
are refused.
"""

import os

from transformers import CONFIG_MAPPING, AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from .modeling.configuration_llava_vr import VisionRememberConfig
from .modeling.processing_llava_vr import VisionRememberProcessor


# Without torchvision, Transformers falls back to the PIL backends with a warning at import: take them directly. Both
# save the same `image_processor_type`, so a checkpoint loads with torchvision wherever it is installed.
if is_torchvision_available():
    from transformers import LlavaNextImageProcessor, SiglipImageProcessor
else:
    from transformers import LlavaNextImageProcessorPil as LlavaNextImageProcessor
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor


def build_image_processor(config: VisionRememberConfig, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)):
    """SigLIP-style preprocessing (resize to the view, no crop), with AnyRes tiles when the config has pinpoints."""
    view = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    common = dict(size=view, image_mean=list(image_mean), image_std=list(image_std))
    if config.image_grid_pinpoints is None:
        return SiglipImageProcessor(**common)
    return LlavaNextImageProcessor(
        crop_size=view, do_center_crop=False, image_grid_pinpoints=config.image_grid_pinpoints, **common
    )


def build_processor(config: VisionRememberConfig, tokenizer, **image_processor_kwargs) -> VisionRememberProcessor:
    """The processor for a model of `config`: the image token is the tokenizer's token at `config.image_token_id`."""
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
    if image_token is None:
        raise ValueError(
            f"The tokenizer has no token at config.image_token_id={config.image_token_id} (it holds {len(tokenizer)} "
            "tokens): add the image token (e.g. '<|image_pad|>') to the tokenizer and set image_token_id to its id, "
            "as vr_hf.conversion.build_from_parts does."
        )
    return VisionRememberProcessor(
        image_processor=build_image_processor(config, **image_processor_kwargs),
        tokenizer=tokenizer,
        tokens_per_side=config.tokens_per_side,
        image_token=image_token,
    )


def generation_prompt_ids(tokenizer, chat_template: str | None = None) -> list[int] | None:
    """The token ids a chat template's generation prompt adds (`<|im_start|>assistant\n` for ChatML): what
    `generation_prompt_ids` in a Vision Remember config needs. `chat_template` defaults to the tokenizer's own; None
    where there is none, or it adds nothing."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    messages = [{"role": "user", "content": "?"}]
    render = dict(chat_template=template, tokenize=False)
    plain = tokenizer.apply_chat_template(messages, **render)
    prompted = tokenizer.apply_chat_template(messages, add_generation_prompt=True, **render)
    if prompted == plain or not prompted.startswith(plain):
        return None
    return tokenizer(prompted[len(plain) :], add_special_tokens=False)["input_ids"]


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


def load_processor(pretrained: str, config=None, **kwargs):
    """The processor of the vr-hf checkpoint in `pretrained` (its config `config`, read when not given), with the
    installed vr-hf's classes; `kwargs` reach `from_pretrained` (`revision`, ...)."""
    config = config or AutoConfig.from_pretrained(pretrained, **kwargs)
    backbone = getattr(config, "backbone_model_type", None)  # set by grafted configs only
    if backbone is None or is_torchvision_available():
        processor = AutoProcessor.from_pretrained(pretrained, **kwargs)
    else:
        processor = without_video(PROCESSOR_MAPPING[CONFIG_MAPPING[backbone]]).from_pretrained(pretrained, **kwargs)
    check_image_token(processor, config, pretrained)
    return processor


def check_image_token(processor, config, pretrained: str):
    """Refuse a processor whose image placeholder is not the model's: the model would find no image in its text."""
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_token_id == config.image_token_id:
        return
    cause = f"the tokenizer holds {len(tokenizer)} tokens"
    if os.path.isdir(pretrained) and not os.path.isfile(os.path.join(pretrained, "tokenizer.json")):
        cause += f": {pretrained} has no tokenizer.json, and a tokenizer loaded without it holds almost nothing"
    raise ValueError(
        f"The processor's image token {processor.image_token!r} has id {image_token_id}, but the model's config "
        f"expects image_token_id={config.image_token_id} ({cause}). Save the checkpoint's own tokenizer with it "
        "(processor.save_pretrained)."
    )
