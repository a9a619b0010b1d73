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
