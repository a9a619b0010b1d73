"""Qwen3-VL with Vision Remember: the native `Qwen3VLForConditionalGeneration`, its weights under their own keys, plus
`model.vision_remember`.

Qwen3-VL's image processor lays each image's patches out merge unit after merge unit (2x2 blocks, row-major), and its
patch merger turns each unit into one vision token: `hidden_states.view(-1, 4, C)` gives each token its own 2x2 block,
which becomes its window of multi-level features. DeepStack stays as Qwen3-VL runs it, unless `config.deepstack` is
off.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLModel
from transformers.utils.generic import can_return_tuple

from .configuration_vision_remember_qwen3_vl import VisionRememberQwen3VLConfig
from .modeling_vision_remember_base import (
    QwenVLImagesMixin,
    RememberImageOutputs,
    VisionRememberForConditionalGenerationMixin,
    VisionRememberModelMixin,
    capture_hidden_states,
)


@dataclass
class RememberImageOutputsWithDeepstack(RememberImageOutputs):
    r"""
    deepstack_features (`list[tuple[torch.FloatTensor]]`, *optional*):
        Per DeepStack encoder layer, each image's merged features, as Qwen3-VL's `get_image_features` returns them;
        zeros with `config.deepstack` off.
    """

    deepstack_features: list | None = None

    def zero(self) -> torch.Tensor:
        return super().zero() + sum(feature.sum() for level in self.deepstack_features for feature in level) * 0


class VisionRememberQwen3VLModel(QwenVLImagesMixin, VisionRememberModelMixin, Qwen3VLModel):
    """[`Qwen3VLModel`] whose image tokens are rewritten after the chosen decoder layers from the multi-level features
    of the 2x2 patch block each was merged from. All Vision Remember logic lives here (trainers call it)."""

    config: VisionRememberQwen3VLConfig

    def __init__(self, config: VisionRememberQwen3VLConfig):
        super().__init__(config)
        self.attach_vision_remember()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor | None = None, **kwargs
    ) -> RememberImageOutputsWithDeepstack:
        """[`Qwen3VLModel.get_image_features`], plus each image's multi-level features `(patches, L * C)` in token
        order and each token's window of them."""
        layers = self.config.remember_feature_layers
        with capture_hidden_states(self.visual.blocks, layers) as states:
            outputs = super().get_image_features(pixel_values, image_grid_thw, **{**kwargs, "return_dict": True})
        if not self.config.deepstack:  # added as zeros: every path that carries DeepStack's features still runs
            outputs.deepstack_features = [[feature * 0 for feature in level] for level in outputs.deepstack_features]
        features = torch.cat([states[layer] for layer in layers], dim=-1)
        local = self.merge_unit_windows(outputs.pooler_output)
        rows = [window.numel() for window in local]
        return RememberImageOutputsWithDeepstack(**outputs, remember_features=features.split(rows), window_index=local)


class VisionRememberQwen3VLForConditionalGeneration(
    VisionRememberForConditionalGenerationMixin, Qwen3VLForConditionalGeneration
):
    """[`Qwen3VLForConditionalGeneration`] with Vision Remember in its `model`; same state-dict keys, plus
    `model.vision_remember.*`."""

    config: VisionRememberQwen3VLConfig

    def __init__(self, config: VisionRememberQwen3VLConfig):
        super(Qwen3VLForConditionalGeneration, self).__init__(config)  # the native head, with our model
        self.model = VisionRememberQwen3VLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.hand_labels_to_model()
        self.post_init()


__all__ = ["VisionRememberQwen3VLForConditionalGeneration", "VisionRememberQwen3VLModel"]
