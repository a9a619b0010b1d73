"""Build a `VisionRememberProcessor` that matches a `VisionRememberConfig`."""

from transformers.utils import is_torchvision_available

from .modeling.configuration_vision_remember import VisionRememberConfig
from .modeling.processing_vision_remember import VisionRememberProcessor


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
    image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
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
