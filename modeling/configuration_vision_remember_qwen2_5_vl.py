"""Qwen2.5-VL with Vision Remember: configuration."""

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig

from .configuration_vision_remember_graft import VisionRememberGraftConfig


@strict
class VisionRememberQwen2_5_VLConfig(VisionRememberGraftConfig, Qwen2_5_VLConfig):
    r"""
    A [`Qwen2_5_VLConfig`] with the Vision Remember settings of [`VisionRememberGraftConfig`]. Each vision token
    attends to the `spatial_merge_size x spatial_merge_size` (2x2) patch block the patch merger built it from; every
    vision encoder layer is at full patch resolution, so `vision_feature_layers` can be any of `0..depth`.
    """

    model_type = "vision_remember_qwen2_5_vl"
    backbone_model_type = "qwen2_5_vl"
    remote_code_files = ("configuration_vision_remember_qwen2_5_vl", "modeling_vision_remember_qwen2_5_vl")

    @property
    def max_vision_feature_layer(self) -> int:
        return self.vision_config.depth


__all__ = ["VisionRememberQwen2_5_VLConfig"]
