"""MiniCPM-V 4.6 with Vision Remember: configuration."""

from huggingface_hub.dataclasses import strict
from transformers.models.minicpmv4_6 import MiniCPMV4_6Config

from .configuration_vision_remember_graft import VisionRememberGraftConfig


DOWNSAMPLE_MODES = ("16x", "4x")


@strict
class VisionRememberMiniCPMV4_6Config(VisionRememberGraftConfig, MiniCPMV4_6Config):
    r"""
    A [`MiniCPMV4_6Config`] with the Vision Remember settings of [`VisionRememberGraftConfig`]. In `"16x"` mode each
    vision token attends to the 4x4 encoder patches it was merged from, in `"4x"` mode to its 2x2 patches. Encoder
    layers after `insert_layer_id` run at half resolution in `"16x"` mode, so `vision_feature_layers` must be in
    `0..insert_layer_id + 1` (which serves both modes).
    """

    model_type = "vision_remember_minicpmv4_6"
    backbone_model_type = "minicpmv4_6"
    remote_code_files = ("configuration_vision_remember_minicpmv4_6", "modeling_vision_remember_minicpmv4_6")

    @property
    def max_vision_feature_layer(self) -> int:
        return self.insert_layer_id + 1

    def validate_minicpmv4_6_graft(self):
        if self.image_token_id is None:
            raise ValueError("image_token_id is None: set it to the id of the tokenizer's image placeholder token.")
        if self.downsample_mode not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample_mode={self.downsample_mode!r} is unknown: use one of {DOWNSAMPLE_MODES}.")
        kernels = {
            "merge_kernel_size": self.merge_kernel_size,
            "window_kernel_size": self.vision_config.window_kernel_size,
        }
        for name, kernel in kernels.items():
            if tuple(kernel) != (2, 2):
                raise ValueError(f"{name}={tuple(kernel)}: Vision Remember supports MiniCPM-V 4.6's 2x2 merges only.")
        if self.merger_times != 1:
            raise ValueError(f"merger_times={self.merger_times}: Vision Remember supports one merge round only.")


__all__ = ["VisionRememberMiniCPMV4_6Config"]
