"""Qwen3-VL with Vision Remember: configuration."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen3VLConfig

from .configuration_vision_remember_graft import VisionRememberGraftConfig


@strict
class VisionRememberQwen3VLConfig(VisionRememberGraftConfig, Qwen3VLConfig):
    r"""
    A [`Qwen3VLConfig`] with the Vision Remember settings of [`VisionRememberGraftConfig`]. Each vision token
    attends to the `spatial_merge_size x spatial_merge_size` (2x2) patch block the patch merger built it from; every
    vision encoder layer is at full patch resolution, so `vision_feature_layers` can be any of `0..depth`.

    Qwen3-VL has its own way back to the uncompressed features, DeepStack: merged features of the encoder layers
    `vision_config.deepstack_visual_indexes` added to the vision tokens after the first decoder layers. It stays as
    it is; `deepstack=False` turns it off, so that the two mechanisms can be compared alone and together.

    Args:
        deepstack (`bool`, *optional*, defaults to `True`):
            Add DeepStack's features to the vision tokens, as Qwen3-VL does.
    """

    model_type = "vision_remember_qwen3_vl"
    backbone_model_type = "qwen3_vl"
    remote_code_files = ("configuration_vision_remember_qwen3_vl", "modeling_vision_remember_qwen3_vl")

    deepstack: bool = True

    @property
    def max_vision_feature_layer(self) -> int:
        return self.vision_config.depth


__all__ = ["VisionRememberQwen3VLConfig"]
