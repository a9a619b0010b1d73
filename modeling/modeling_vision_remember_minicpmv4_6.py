"""MiniCPM-V 4.6 with Vision Remember: the native `MiniCPMV4_6ForConditionalGeneration`, its weights under their own
keys, plus `model.vision_remember`.

The encoder runs on each image's row-major patch grid. In `"16x"` mode the window-attention merger after
`insert_layer_id` merges 2x2 patches and the final merger 2x2 of those: each vision token covers a 4x4 block of the
full-resolution patches. In `"4x"` mode only the final merger runs: 2x2 blocks. That block of full-resolution hidden
states (layers up to `insert_layer_id`) is each token's window of multi-level features.
"""

import torch
from torch import nn
from transformers.models.minicpmv4_6.modeling_minicpmv4_6 import (
    MiniCPMV4_6ForConditionalGeneration,
    MiniCPMV4_6Model,
)
from transformers.utils.generic import can_return_tuple

from .configuration_vision_remember_minicpmv4_6 import VisionRememberMiniCPMV4_6Config
from .modeling_vision_remember_base import (
    RememberImageOutputs,
    VisionRememberForConditionalGenerationMixin,
    VisionRememberModelMixin,
    capture_hidden_states,
)
from .vision_remember import block_windows


PATCHES_PER_TOKEN_SIDE = {"16x": 4, "4x": 2}


class VisionRememberMiniCPMV4_6Model(VisionRememberModelMixin, MiniCPMV4_6Model):
    """[`MiniCPMV4_6Model`] whose image tokens are rewritten after the chosen decoder layers from the multi-level
    features of the patch block each was merged from. All Vision Remember logic lives here (trainers call it)."""

    config: VisionRememberMiniCPMV4_6Config

    def __init__(self, config: VisionRememberMiniCPMV4_6Config):
        super().__init__(config)
        self.attach_vision_remember()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, target_sizes: torch.IntTensor, downsample_mode: str | None = None, **kwargs
    ) -> RememberImageOutputs:
        """[`MiniCPMV4_6Model.get_image_features`], plus each image's multi-level features `(patches, L * C)` and each
        token's window of them."""
        mode = downsample_mode or self.config.downsample_mode
        if mode not in PATCHES_PER_TOKEN_SIDE:
            raise ValueError(f"downsample_mode={mode!r} is unknown: use one of {tuple(PATCHES_PER_TOKEN_SIDE)}.")
        layers = self.config.remember_feature_layers
        with capture_hidden_states(self.vision_tower.encoder.layers, layers) as states:
            outputs = super().get_image_features(pixel_values, target_sizes, downsample_mode=mode, **kwargs)
        features = torch.cat([states[layer][0] for layer in layers], dim=-1)
        side = PATCHES_PER_TOKEN_SIDE[mode]
        sizes = target_sizes.tolist()
        rows = [height * width for height, width in sizes]
        local = [block_windows(height, width, side) for height, width in sizes]
        return RememberImageOutputs(**outputs, remember_features=features.split(rows), window_index=local)

    def encode_images(
        self, pixel_values: torch.Tensor, target_sizes: torch.IntTensor, downsample_mode: str | None = None, **kwargs
    ):
        """`get_image_features`, called as the native forward calls it."""
        return self.get_image_features(pixel_values[:1], target_sizes, downsample_mode=downsample_mode)

    def image_token_counts(
        self, pixel_values: torch.Tensor, target_sizes: torch.IntTensor, downsample_mode: str | None = None, **kwargs
    ) -> list[int]:
        side = PATCHES_PER_TOKEN_SIDE.get(downsample_mode or self.config.downsample_mode, 4)
        return (target_sizes.prod(dim=-1) // side**2).tolist()

    def stand_in_image(self) -> dict:
        """A blank image of one vision token: one 4x4 block of patches, packed as the image processor packs it."""
        vision, device = self.config.vision_config, self.device
        side = PATCHES_PER_TOKEN_SIDE["16x"]
        pixel_values = torch.zeros(
            1, vision.num_channels, vision.patch_size, side * side * vision.patch_size, device=device
        )
        return {
            "pixel_values": pixel_values.to(self.vision_tower.dtype),
            "target_sizes": torch.tensor([[side, side]], device=device),
            "downsample_mode": "16x",
        }


class VisionRememberMiniCPMV4_6ForConditionalGeneration(
    VisionRememberForConditionalGenerationMixin, MiniCPMV4_6ForConditionalGeneration
):
    """[`MiniCPMV4_6ForConditionalGeneration`] with Vision Remember in its `model`; same state-dict keys, plus
    `model.vision_remember.*`."""

    config: VisionRememberMiniCPMV4_6Config

    def __init__(self, config: VisionRememberMiniCPMV4_6Config):
        super(MiniCPMV4_6ForConditionalGeneration, self).__init__(config)  # the native head, with our model
        self.model = VisionRememberMiniCPMV4_6Model(config)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, self.vocab_size, bias=False)
        self.hand_labels_to_model()
        self.post_init()


__all__ = ["VisionRememberMiniCPMV4_6ForConditionalGeneration", "VisionRememberMiniCPMV4_6Model"]
