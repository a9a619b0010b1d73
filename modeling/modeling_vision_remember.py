"""LLaVA-VR: a LLaVA-NeXT style model whose compressed vision tokens remember the uncompressed features."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils.generic import can_return_tuple

from .configuration_vision_remember import VisionRememberConfig
from .image_layout import ImageLayout, image_windows, stack_windows
from .projectors import PerceiverProjector, build_projector
from .vision_remember import VisionRemember, init_vision_remember_weights


IGNORE_INDEX = -100


@dataclass
class VisionRememberModelOutputWithPast(BaseModelOutputWithPast):
    r"""
    image_hidden_states (`torch.FloatTensor`, *optional*):
        The vision tokens of every image, `(num_vision_tokens, hidden_size)`, as they enter the decoder.
    """

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class VisionRememberCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # (num_vision_tokens, Dt), all images in order
    features: torch.Tensor | None  # (num_feature_positions, L * Dv) multi-level features, None without Vision Remember
    window_index: torch.Tensor | None  # (num_vision_tokens, window) rows of `features`


def image_size_list(pixel_values: torch.Tensor, image_sizes) -> list:
    """One `(height, width)` per image, or `None` per image without AnyRes."""
    return [None] * len(pixel_values) if image_sizes is None else list(image_sizes)


def prompt_mask(input_ids, image_token_id, attention_mask=None, labels=None, prompt_length=None) -> torch.Tensor:
    """Positions that feed the text-guided token: prompt text only, never an answer the model is trained on.

    With `labels`, the text before each sample's first supervised token; in generation, the text before
    `prompt_length`, so generated tokens never feed it, cached or not.
    """
    mask = input_ids != image_token_id
    if attention_mask is not None and attention_mask.dim() == 2:
        mask &= attention_mask.bool()
    if labels is not None:
        mask &= (labels != IGNORE_INDEX).cumsum(dim=-1) == 0
    if prompt_length is not None:
        mask[:, prompt_length:] = False
    return mask


def check_image_tokens(is_image_token: torch.Tensor, tokens_per_image: list[int]):
    """Raise, before any compute, unless each sample's image tokens are whole images, in order."""
    per_sample = is_image_token.sum(dim=1).tolist()
    if sum(per_sample) != sum(tokens_per_image):
        raise ValueError(
            f"input_ids hold {sum(per_sample)} image tokens but the {len(tokens_per_image)} images need "
            f"{sum(tokens_per_image)} ({tokens_per_image} per image): build the inputs with the model's processor, "
            "which writes one image token per vision token, and pass exactly one image per image placeholder."
        )
    boundaries = set(torch.tensor([0] + tokens_per_image).cumsum(0).tolist())
    seen = 0
    for sample, count in enumerate(per_sample):
        seen += count
        if seen not in boundaries:
            raise ValueError(
                f"sample {sample} ends in the middle of an image: its image tokens do not add up to whole images "
                f"({tokens_per_image} tokens per image). The text was probably truncated inside an image placeholder: "
                "raise max_length, or truncate before the image."
            )


def hand_labels_to_model(module, args, kwargs):
    """Forward pre-hook on the head. Trainers with a fused LM head (TRL's `SFTTrainer`) keep `labels` for themselves
    and call `self.model` without them: hand them over, so the text-guided token still never pools an answer."""
    module.model.caller_labels = kwargs.get("labels")


def forget_caller_labels(module, args, kwargs, output):
    module.model.caller_labels = None


class VisionRememberPreTrainedModel(PreTrainedModel):
    config: VisionRememberConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        if isinstance(module, VisionRememberModel) and module.image_newline is not None:
            init.normal_(module.image_newline, std=1 / math.sqrt(config.text_config.hidden_size))
        elif isinstance(module, PerceiverProjector):
            init.normal_(module.latents, std=1 / math.sqrt(config.text_config.hidden_size))
        else:
            init_vision_remember_weights(module, config.identity_init)


class VisionRememberModel(VisionRememberPreTrainedModel):
    """Vision tower, projector and decoder, with the Vision Remember blocks hooked between decoder layers.

    All Vision Remember logic lives here, not in the head, since trainers call this module directly.
    """

    def __init__(self, config: VisionRememberConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = build_projector(config)
        anyres = config.image_grid_pinpoints is not None
        self.image_newline = nn.Parameter(torch.empty(config.text_config.hidden_size)) if anyres else None
        self.language_model = AutoModel.from_config(config.text_config)
        self.image_layout = ImageLayout.from_config(config)
        self.caller_labels = None  # the head's `labels` when a trainer calls this module without them
        self.vision_remember = VisionRemember(config) if config.use_vision_remember else None
        if self.vision_remember is not None:
            self.vision_remember.attach(self.language_model.layers)
        self.post_init()

    def flatten_views(self, pixel_values: torch.Tensor, sizes: list) -> torch.Tensor:
        """`(images, max_views, 3, H, W)` padded as the image processor returns it, to `(views, 3, H, W)`."""
        if pixel_values.dim() == 4:
            return pixel_values
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}: expected (views, 3, H, W) or "
                "(images, max_views, 3, H, W) as the processor returns it."
            )
        views = [image[: self.image_layout.num_views(size)] for image, size in zip(pixel_values, sizes)]
        return torch.cat(views)

    def select_features(self, hidden_states: tuple[torch.Tensor], layers: list[int]) -> torch.Tensor:
        features = torch.cat([hidden_states[layer] for layer in layers], dim=-1)
        return features[:, 1:] if self.config.vision_feature_select_strategy == "default" else features

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> ImageFeatures:
        """Run the vision tower and projector; lay the tokens out per image; keep the multi-level features."""
        sizes = image_size_list(pixel_values, image_sizes)
        views = self.flatten_views(pixel_values, sizes).to(self.vision_tower.dtype)
        hidden_states = self.vision_tower(views, output_hidden_states=True).hidden_states
        tokens = self.multi_modal_projector(self.select_features(hidden_states, [self.config.projector_feature_layer]))
        per_image = tokens.split([self.image_layout.num_views(size) for size in sizes])
        packed = [self.image_layout.pack(image, size, self.image_newline) for image, size in zip(per_image, sizes)]
        tokens = torch.cat(packed)
        if self.vision_remember is None:
            return ImageFeatures(tokens, None, None)

        window_index = stack_windows(image_windows(self.config, sizes, pixel_values.device))
        features = self.select_features(hidden_states, self.config.remember_feature_layers).flatten(0, 1)
        return ImageFeatures(tokens, features, window_index)

    def check_image_inputs(self, input_ids, pixel_values, image_sizes):
        """Refuse inputs that cannot work before the vision tower runs."""
        image_token_id = self.config.image_token_id
        if pixel_values is None:
            if input_ids is not None and bool((input_ids == image_token_id).any()):
                count = int((input_ids == image_token_id).sum())
                raise ValueError(
                    f"input_ids hold {count} image tokens (id {image_token_id}) but no pixel_values were given: pass "
                    "the images the processor returned with the text."
                )
            return
        if input_ids is None:
            raise ValueError("pixel_values need input_ids, whose image tokens mark where the vision tokens go.")
        if self.config.image_grid_pinpoints is not None and image_sizes is None:
            raise ValueError(
                "This model uses AnyRes (image_grid_pinpoints is set): pass image_sizes with pixel_values."
            )
        sizes = image_size_list(pixel_values, image_sizes)
        check_image_tokens(input_ids == image_token_id, [self.image_layout.num_tokens(size) for size in sizes])

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_length: int | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> VisionRememberModelOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Only used to keep answers out of the text-guided token: text from each sample's first supervised token on
            never feeds it. The loss is the head's.
        prompt_length (`int`, *optional*):
            Positions from `prompt_length` on are generated text and never feed the text-guided token. Set by
            `generate()`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        has_images = pixel_values is not None and len(pixel_values) > 0
        self.check_image_inputs(input_ids, pixel_values if has_images else None, image_sizes)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if has_images:
            image_features = self.get_image_features(pixel_values, image_sizes)
            token_batch, token_position = (input_ids == self.config.image_token_id).nonzero(as_tuple=True)
            vision_tokens = image_features.tokens.to(inputs_embeds.dtype)
            inputs_embeds = inputs_embeds.index_put((token_batch, token_position), vision_tokens)
            if self.vision_remember is not None:
                labels = labels if labels is not None else self.caller_labels
                guidance = prompt_mask(input_ids, self.config.image_token_id, attention_mask, labels, prompt_length)
                kwargs["vision_remember"] = self.vision_remember.prepare(
                    image_features.features, token_batch, token_position, image_features.window_index, guidance
                )

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return VisionRememberModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=None if image_features is None else image_features.tokens,
        )


class VisionRememberForConditionalGeneration(VisionRememberPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VisionRememberConfig):
        super().__init__(config)
        self.model = VisionRememberModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.register_forward_pre_hook(hand_labels_to_model, with_kwargs=True)
        self.register_forward_hook(forget_caller_labels, with_kwargs=True, always_call=True)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values: torch.Tensor, image_sizes=None) -> ImageFeatures:
        return self.model.get_image_features(pixel_values, image_sizes)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_length: int | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> VisionRememberCausalLMOutputWithPast:
        outputs = self.model(
            input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            prompt_length=prompt_length,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return VisionRememberCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`, with the prompt length pinned: generated text never feeds Vision Remember."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and kwargs.get("pixel_values") is not None:
            kwargs.setdefault("prompt_length", input_ids.shape[1])
        return super().generate(inputs, **kwargs)


__all__ = ["VisionRememberModel", "VisionRememberForConditionalGeneration", "VisionRememberPreTrainedModel"]
