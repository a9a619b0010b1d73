"""Qwen2.5-VL with Vision Remember: the native `Qwen2_5_VLForConditionalGeneration`, its weights under their own keys,
plus `model.vision_remember`.

Qwen2.5-VL's patch merger turns each 2x2 block of encoder patches into one vision token. Its encoder runs on the merge
units in window-attention order; `hidden_states.view(-1, 4, C)[argsort(window_index)]` restores token order and gives
each token its own 2x2 block, which becomes its window of multi-level features.
"""

import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
)
from transformers.utils.generic import can_return_tuple
from transformers.vision_utils import get_vision_window_index

from .configuration_vision_remember_qwen2_5_vl import VisionRememberQwen2_5_VLConfig
from .modeling_vision_remember_base import (
    QwenVLImagesMixin,
    RememberImageOutputs,
    VisionRememberForConditionalGenerationMixin,
    VisionRememberModelMixin,
    capture_hidden_states,
)


class VisionRememberQwen2_5_VLModel(QwenVLImagesMixin, VisionRememberModelMixin, Qwen2_5_VLModel):
    """[`Qwen2_5_VLModel`] whose image tokens are rewritten after the chosen decoder layers from the multi-level
    features of the 2x2 patch block each was merged from. All Vision Remember logic lives here (trainers call it)."""

    config: VisionRememberQwen2_5_VLConfig

    def __init__(self, config: VisionRememberQwen2_5_VLConfig):
        super().__init__(config)
        self.attach_vision_remember()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> RememberImageOutputs:
        """[`Qwen2_5_VLModel.get_image_features`], plus each image's multi-level features `(patches, L * C)` in token
        order and each token's window of them."""
        visual, layers = self.visual, self.config.remember_feature_layers
        with capture_hidden_states(visual.blocks, layers) as states:
            outputs = super().get_image_features(pixel_values, image_grid_thw, **{**kwargs, "return_dict": True})
        window_order, _ = get_vision_window_index(
            image_grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        token_order = torch.argsort(window_order.to(pixel_values.device))
        unit = visual.spatial_merge_unit
        features = torch.cat(
            [states[layer].view(-1, unit, states[layer].shape[-1])[token_order].flatten(0, 1) for layer in layers],
            dim=-1,
        )
        local = self.merge_unit_windows(outputs.pooler_output)
        rows = [window.numel() for window in local]
        return RememberImageOutputs(**outputs, remember_features=features.split(rows), window_index=local)


class VisionRememberQwen2_5_VLForConditionalGeneration(
    VisionRememberForConditionalGenerationMixin, Qwen2_5_VLForConditionalGeneration
):
    """[`Qwen2_5_VLForConditionalGeneration`] with Vision Remember in its `model`; same state-dict keys, plus
    `model.vision_remember.*`."""

    config: VisionRememberQwen2_5_VLConfig

    def __init__(self, config: VisionRememberQwen2_5_VLConfig):
        super(Qwen2_5_VLForConditionalGeneration, self).__init__(config)  # the native head, with our model
        self.model = VisionRememberQwen2_5_VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.hand_labels_to_model()
        self.post_init()


__all__ = ["VisionRememberQwen2_5_VLForConditionalGeneration", "VisionRememberQwen2_5_VLModel"]
