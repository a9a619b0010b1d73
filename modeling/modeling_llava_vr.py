"""LLaVA-VR: a LLaVA-NeXT style model whose compressed vision tokens remember the uncompressed features.

`EfficientLlavaModel` is the efficient LVLM the paper starts from: a vision tower, a projector that compresses its
features by `s**2`, the LLaVA-NeXT AnyRes layout, and a decoder. `VisionRememberModel` adds Vision Remember to it
exactly as the grafts add it to Transformers' Qwen2.5-VL, Qwen3-VL and MiniCPM-V (`modeling_vision_remember_base`).
"""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_llava_vr import VisionRememberConfig
from .deepstack import DeepStackLayer
from .fastv import FastV
from .image_layout import ImageLayout, image_windows
from .modeling_vision_remember_base import (
    RememberImageOutputs,
    VisionRememberForConditionalGenerationMixin,
    VisionRememberModelMixin,
    VisionRememberPreTrainedMixin,
    placeholder_mask,
)
from .projectors import PerceiverProjector, build_projector
from .spatial_vision_aggregator import SpatialVisionAggregator
from .vision_remember import VisionRememberLayer


REFUSION_BLOCKS = {"vision_remember": VisionRememberLayer, "deepstack": DeepStackLayer, "sva": SpatialVisionAggregator}


@dataclass
class VisionRememberModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_outputs (`RememberImageOutputs`, *optional*):
        What `get_image_features` returned for the images of this forward; `None` without images.
    image_hidden_states (`torch.FloatTensor`, *optional*):
        The vision tokens of every image, `(num_vision_tokens, hidden_size)`, as they enter the decoder.
    """

    image_outputs: RememberImageOutputs | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class VisionRememberCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    image_outputs (`RememberImageOutputs`, *optional*):
        What `get_image_features` returned for the images of this forward; `None` without images.
    image_hidden_states (`torch.FloatTensor`, *optional*):
        The vision tokens of every image, `(num_vision_tokens, hidden_size)`, as they enter the decoder.
    """

    image_outputs: RememberImageOutputs | None = None
    image_hidden_states: torch.FloatTensor | None = None


class VisionRememberPreTrainedModel(VisionRememberPreTrainedMixin, PreTrainedModel):
    config: VisionRememberConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = 1 / math.sqrt(self.config.text_config.hidden_size)
        if isinstance(module, EfficientLlavaModel) and module.image_newline is not None:
            init.normal_(module.image_newline, std=std)
        elif isinstance(module, PerceiverProjector):
            init.normal_(module.latents, std=std)


class EfficientLlavaModel(VisionRememberPreTrainedModel):
    """Vision tower, compressing projector and decoder, with LLaVA-NeXT's AnyRes layout. Images reach its forward
    encoded, as `mm_encoder_outputs`; `VisionRememberModel` encodes them."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        anyres = config.image_grid_pinpoints is not None
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if anyres else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.image_layout = ImageLayout.from_config(config)

    def image_sizes_list(self, pixel_values: torch.Tensor, image_sizes) -> list:
        """One `(height, width)` per image, or `None` per image without AnyRes; refuses what cannot be encoded."""
        if self.config.image_grid_pinpoints is not None and image_sizes is None:
            raise ValueError(
                "This model uses AnyRes (image_grid_pinpoints is set): pass image_sizes with pixel_values."
            )
        view = self.config.vision_config.image_size
        if pixel_values.dim() not in (4, 5) or tuple(pixel_values.shape[-3:]) != (3, view, view):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}: expected (views, 3, {view}, {view}) or "
                f"(images, max_views, 3, {view}, {view}), views of the vision tower's {view}x{view} pixels, as the "
                "model's image processor returns them."
            )
        if image_sizes is None:
            return [None] * len(pixel_values)
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(size) for size in image_sizes]
        views = [self.image_layout.num_views(size) for size in sizes]
        if pixel_values.dim() == 4:
            fits = len(pixel_values) == sum(views)
        else:
            fits = len(pixel_values) == len(sizes) and pixel_values.shape[1] >= max(views)
        if not fits:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the views of the {len(sizes)} images "
                f"of image_sizes, {views} views each (the base view and its AnyRes tiles): pass the pixel_values and "
                "image_sizes the image processor returned together."
            )
        return sizes

    def image_token_counts(self, pixel_values: torch.Tensor, image_sizes=None, **kwargs) -> list[int]:
        return [self.image_layout.num_tokens(size) for size in self.image_sizes_list(pixel_values, image_sizes)]

    def flatten_views(self, pixel_values: torch.Tensor, sizes: list) -> torch.Tensor:
        """`(images, max_views, 3, H, W)` padded as the image processor returns it, to `(views, 3, H, W)`."""
        if pixel_values.dim() == 4:
            return pixel_values
        return torch.cat([image[: self.image_layout.num_views(size)] for image, size in zip(pixel_values, sizes)])

    def select_features(self, hidden_states: tuple[torch.Tensor], layers: list[int]) -> torch.Tensor:
        features = torch.cat([hidden_states[layer] for layer in layers], dim=-1)
        return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> RememberImageOutputs:
        """Run the vision tower and projector and lay the tokens out per image (`pooler_output`); with Vision Remember,
        also keep each image's multi-level features and its tokens' windows of them. The tower's `hidden_states` and
        `attentions` are returned where asked for (`output_hidden_states`, `output_attentions`, or the config).

        Like the native `get_image_features`, this names no `output_*` argument: `generate()` hands an encoder the
        arguments its signature names and keeps them from the decoder."""
        sizes = self.image_sizes_list(pixel_values, image_sizes)
        views = self.flatten_views(pixel_values, sizes).to(self.vision_tower.dtype)
        output_attentions = kwargs.get("output_attentions")
        tower_arguments = {} if output_attentions is None else {"output_attentions": output_attentions}
        outputs = self.vision_tower(views, output_hidden_states=True, **tower_arguments)
        hidden_states = outputs.hidden_states
        tokens = self.multi_modal_projector(self.select_features(hidden_states, self.config.projector_feature_layers))
        # The tower's own outputs (after its final norm and pooling head) are not what LLaVA reads: a zero share of
        # them gives those weights a gradient too, so that every trainable parameter has one on every step.
        unread = [getattr(outputs, name, None) for name in ("last_hidden_state", "pooler_output")]
        unread = [output for output in unread if output is not None]
        tokens = tokens + sum(output.sum() for output in unread) * 0
        views_per_image = [self.image_layout.num_views(size) for size in sizes]
        per_image = zip(tokens.split(views_per_image), sizes)
        keep_hidden_states = kwargs.get("output_hidden_states") or self.config.vision_config.output_hidden_states
        image_outputs = RememberImageOutputs(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=tuple(self.image_layout.pack(image, size, self.image_newline) for image, size in per_image),
            hidden_states=hidden_states if keep_hidden_states else None,
            attentions=outputs.attentions,
        )
        if getattr(self, "vision_remember", None) is not None:
            features = self.select_features(hidden_states, self.config.remember_feature_layers)
            rows = [count * features.shape[1] for count in views_per_image]
            image_outputs.remember_features = features.flatten(0, 1).split(rows)
            image_outputs.window_index = image_windows(self.config, sizes)
        return image_outputs

    def encode_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None, **kwargs):
        """`get_image_features`, called with the forward's arguments."""
        return self.get_image_features(pixel_values, image_sizes, return_dict=True)

    def stand_in_image(self) -> dict:
        """A blank image of one view's size, as the image processor lays it out."""
        size, device, dtype = self.config.vision_config.image_size, self.device, self.vision_tower.dtype
        if self.config.image_grid_pinpoints is None:
            return {"pixel_values": torch.zeros(1, 3, size, size, device=device, dtype=dtype)}
        views = self.image_layout.num_views((size, size))
        pixel_values = torch.zeros(1, views, 3, size, size, device=device, dtype=dtype)
        return {"pixel_values": pixel_values, "image_sizes": torch.tensor([[size, size]], device=device)}

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, RememberImageOutputs] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VisionRememberModelOutputWithPast:
        if input_ids is None and inputs_embeds is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        images = (mm_encoder_outputs or {}).get("image")
        tokens = None
        if images is not None:
            tokens = torch.cat(images.pooler_output).to(inputs_embeds)
            mask = placeholder_mask(self, input_ids, inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(mask[..., None], tokens)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return VisionRememberModelOutputWithPast(**outputs, image_outputs=images, image_hidden_states=tokens)


class VisionRememberModel(VisionRememberModelMixin, EfficientLlavaModel):
    """[`EfficientLlavaModel`] with the Vision Remember blocks hooked between decoder layers (none with
    `use_vision_remember=False`, the baseline). All Vision Remember logic lives here, not in the head, since trainers
    call this module directly."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__(config)
        self.vision_remember = None
        if config.use_vision_remember:
            self.attach_vision_remember(REFUSION_BLOCKS[config.refusion])
        if config.fastv_layer is not None:
            self.fastv = FastV(config)
            self.fastv.attach(self.language_model.layers)
        self.post_init()


class VisionRememberForConditionalGeneration(
    VisionRememberForConditionalGenerationMixin, VisionRememberPreTrainedModel, GenerationMixin
):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: VisionRememberConfig):
        super().__init__(config)
        self.model = VisionRememberModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.hand_labels_to_model()
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes=None, **kwargs) -> RememberImageOutputs:
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, RememberImageOutputs] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> VisionRememberCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Language-modelling labels (-100 where not supervised). Text from each sample's first supervised token on
            never feeds the text-guided token.
        prompt_mask (`torch.BoolTensor` of shape `(batch_size, prompt_length)`, *optional*):
            True on each sample's prompt: only those positions feed the text-guided token. Set by `generate()`; pass
            it when scoring continuations without labels.
        """
        outputs = self.model(
            input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            prompt_mask=prompt_mask,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        rest = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
        return VisionRememberCausalLMOutputWithPast(loss=loss, logits=logits, **rest)


__all__ = ["VisionRememberModel", "VisionRememberForConditionalGeneration", "VisionRememberPreTrainedModel"]
