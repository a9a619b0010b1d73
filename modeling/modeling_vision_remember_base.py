"""What every model with Vision Remember shares, LLaVA-VR and the grafted native VLMs alike: one image path.

A model mixes `VisionRememberModelMixin` into a model whose forward takes pre-encoded images as `mm_encoder_outputs`
and hands its `**kwargs` to every decoder layer (LLaVA-VR's own, Transformers' `Qwen2_5_VLModel`, `MiniCPMV4_6Model`),
and `VisionRememberForConditionalGenerationMixin` into its head. A backbone only says how its encoder yields each
image's vision tokens, multi-level features and windows (`get_image_features`, returning `RememberImageOutputs`), which
arguments it takes (`encode_images`), and how many vision tokens each image makes before encoding it
(`image_token_counts`). Everything else is here, once:

- the placeholders, found from `input_ids` or, without them, by comparing `inputs_embeds` with the image token's
  embedding, and checked against the images before any image is encoded;
- the prompt rule (`guidance_mask`): which text feeds the text-guided token;
- the Vision Remember context, handed to the decoder layers' hooks through the native forward's `**kwargs`;
- generation: images encoded once, their Vision Remember extras regrouped per beam and returned sequence like
  `pooler_output`, the prompt pinned so that generated text never feeds the text-guided token.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging

from .conversation_turns import PromptTurns
from .vision_remember import (
    TokenLayout,
    VisionRemember,
    VisionRememberLayer,
    fork_rng_on,
    init_vision_remember_weights,
)


logger = logging.get_logger(__name__)

REFUSED_WITH_IMAGES = {
    "prefill_chunk_size": "its text-guided token pools the whole prompt, so the prompt must be read in one prefill "
    "(generate with prefill_chunk_size=None)",
    "prompt_lookup_num_tokens": "prompt lookup proposes tokens copied from the prompt, image placeholders among them, "
    "which would read as more images than were given (decode with an assistant model, or without one)",
}


@dataclass
class RememberImageOutputs(BaseModelOutputWithPooling):
    r"""
    The native `get_image_features` outputs (each image's vision tokens as `pooler_output`), plus what Vision Remember
    reads, per image like `pooler_output`, so that generation regroups them per beam or returned sequence the same way:

    remember_features (`tuple(torch.FloatTensor)`, one of shape `(feature_rows, L * Dv)` per image):
        The multi-level vision features of each image. None for a model without Vision Remember.
    window_index (`tuple(torch.LongTensor)`, one of shape `(vision_tokens, window)` per image, on the host):
        Each of the image's vision tokens' rows of its `remember_features` it was compressed from, -1 where none. It
        follows from the image sizes alone, so it is built where they are read, and the blocks copy it once.
    """

    remember_features: tuple[torch.FloatTensor, ...] | None = None
    window_index: tuple[torch.LongTensor, ...] | None = None

    def token_counts(self) -> list[int]:
        return [len(tokens) for tokens in self.pooler_output]

    def zero(self) -> torch.Tensor:
        """0, computed from every image's vision tokens: added to a loss, it gives every parameter that made them a
        gradient (of zero)."""
        return sum(tokens.sum() for tokens in self.pooler_output) * 0

    def select_images(self, order: list[int]):
        """Keep images `order` (repeats allowed), in that order."""
        self.pooler_output = [self.pooler_output[index] for index in order]
        if self.remember_features is not None:
            self.remember_features = tuple(self.remember_features[index] for index in order)
            self.window_index = tuple(self.window_index[index] for index in order)


def placeholder_mask(model, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """`(batch, sequence)`: where `model`'s image tokens are, from `input_ids` or, without them, by their embedding."""
    if input_ids is not None:
        return input_ids == model.config.image_token_id
    image_token = torch.tensor(model.config.image_token_id, device=inputs_embeds.device)
    return (inputs_embeds == model.get_input_embeddings()(image_token)).all(dim=-1)


def check_image_tokens(placeholders: torch.Tensor, tokens_per_image: list[int]):
    """Raise unless each sample's image placeholders (a `(batch, sequence)` mask on the host) are whole images, in
    order."""
    per_sample = placeholders.sum(dim=1).tolist()
    if sum(per_sample) != sum(tokens_per_image):
        truncated = " (or the text was truncated inside one: raise max_length)" if sum(per_sample) else ""
        raise ValueError(
            f"The text holds {sum(per_sample)} image tokens but the {len(tokens_per_image)} images need "
            f"{sum(tokens_per_image)} ({tokens_per_image} per image): build the inputs with the model's processor, "
            f"which writes one image token per vision token, and pass exactly one image per image placeholder"
            f"{truncated}."
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


def keep_caller_labels(module, args, kwargs):
    """Forward pre-hook on the head. Trainers with a fused LM head (TRL's `SFTTrainer`) keep `labels` for themselves
    and call `self.model` without them: hand them over, so the text-guided token still never pools an answer."""
    module.model.caller_labels = kwargs.get("labels")


def forget_caller_labels(module, args, kwargs, output):
    module.model.caller_labels = None


def _keep_input(states: dict, index: int, module, args):
    states[index] = args[0]


def _keep_output(states: dict, index: int, module, args, output):
    states[index] = output


@contextmanager
def capture_hidden_states(layers: nn.ModuleList, indices: list[int]):
    """Collect the encoder's `hidden_states[index]` (0: the input of `layers[0]`, `i`: the output of `layers[i - 1]`)
    while it runs inside the `with` block, without keeping the others."""
    states = {}
    handles = [
        layers[0].register_forward_pre_hook(partial(_keep_input, states, 0))
        if index == 0
        else layers[index - 1].register_forward_hook(partial(_keep_output, states, index))
        for index in set(indices)
    ]
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


class VisionRememberPreTrainedMixin:
    """Initialises the Vision Remember weights; goes first in the bases of both the model and its head."""

    def post_init(self):
        """Also keep, of the no-split module classes the sub-models declare, those this model has (SigLIP declares
        its text embeddings too): what shards or places the model by class, FSDP's auto-wrap policy or a device map,
        then finds every class it is given."""
        super().post_init()
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules if name in present}

    @classmethod
    def is_custom_code(cls) -> bool:
        """Transformers initialises custom code conservatively: it skips every module without parameters of its own,
        which would skip the nested vision tower's own scheme (SigLIP initialises its attention and MLP modules) for
        weights a checkpoint lacks. These models initialise with `transformers.initialization`, as native ones do."""
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        """The backbone's initialisation, then Vision Remember's own; Vision Remember's weights draw from a random
        stream of their own (`VisionRemember.own_random_stream`)."""
        remember = getattr(self, "vision_remember", None)
        if remember is None or not any(module is part for part in remember.modules()):
            return super()._init_weights(module)
        device = next(module.parameters(recurse=False), torch.empty(0)).device
        with remember.own_random_stream(device):
            super()._init_weights(module)
        init_vision_remember_weights(module, self.config.identity_init)


class VisionRememberModelMixin(VisionRememberPreTrainedMixin):
    """Adds `vision_remember` to a model with a decoder at `language_model.layers`.

    The backbone defines `get_image_features` (returning `RememberImageOutputs`), `encode_images(pixel_values,
    **kwargs)` (its `get_image_features`, called with the arguments of its forward), `image_token_counts(
    pixel_values, **kwargs)` (vision tokens per image, from the same arguments, before any image is encoded) and
    `stand_in_image()` (the `encode_images` arguments of a smallest blank image).
    """

    caller_labels = None  # the head's `labels` when a trainer calls this module without them
    fastv = None  # LLaVA-VR's FastV (`fastv_layer`), the pruning rival of Vision Remember

    def attach_vision_remember(self, block: type[nn.Module] = VisionRememberLayer):
        """Call in `__init__`, after the decoder is built, before `post_init`. Building the blocks draws nothing from
        the global random stream."""
        with fork_rng_on(torch.get_default_device()):
            self.vision_remember = VisionRemember(self.config, block)
        self.vision_remember.attach(self.language_model.layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ):
        r"""
        Takes every argument of the native forward, and:

        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Only used to keep answers out of the text-guided token: text from each sample's first supervised token on
            never feeds it. The loss is the head's.
        prompt_mask (`torch.BoolTensor` of shape `(batch_size, prompt_length)`, *optional*):
            True on each sample's prompt: only those positions (and none after `prompt_length`) feed the text-guided
            token. `generate()` sets it to the prompt it was given; pass it when scoring continuations without labels.
        """
        images = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and images is not None:
            raise ValueError("Pass either pixel_values or mm_encoder_outputs['image'], not both.")
        stand_in = None
        if pixel_values is not None and len(pixel_values) > 0 or images is not None:
            labels = labels if labels is not None else self.caller_labels
            turns = self.read_turns(
                input_ids, inputs_embeds, pixel_values, images, kwargs, attention_mask, labels, prompt_mask
            )
            layout = None
            if self.vision_remember is not None:
                turns.warn_where_unclear(self.config, labels is not None, prompt_mask is not None)
                pooled = turns.pooled if self.vision_remember.text_guidance else None
                layout = TokenLayout.from_turns(turns.placeholders, turns.turns, pooled, self.device)
            if self.fastv is not None:  # before any image is encoded: it refuses attention without 4-D masks
                implementation = self.language_model.config._attn_implementation
                kwargs["fastv"] = self.fastv.prepare(turns, self.device, implementation)
            if images is None:
                images = self.encode_images(pixel_values, **kwargs)
                mm_encoder_outputs, pixel_values = {**(mm_encoder_outputs or {}), "image": images}, None
            if layout is not None:
                if images.remember_features is None:
                    raise ValueError(
                        "mm_encoder_outputs['image'] holds no Vision Remember features: pass pixel_values, or the "
                        "output of this model's own get_image_features."
                    )
                kwargs["vision_remember"] = self.vision_remember.prepare(
                    layout, images.remember_features, images.window_index
                )
        elif self.training and torch.is_grad_enabled():
            stand_in = self.run_stand_in_image(len(input_ids if input_ids is not None else inputs_embeds), kwargs)
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        if stand_in is None:
            return outputs
        if isinstance(outputs, tuple):  # return_dict=False
            return (outputs[0] + stand_in, *outputs[1:])
        outputs.last_hidden_state = outputs.last_hidden_state + stand_in
        return outputs

    def read_turns(
        self,
        input_ids,
        inputs_embeds,
        pixel_values,
        images,
        kwargs: dict,
        attention_mask=None,
        labels=None,
        prompt_mask=None,
    ) -> PromptTurns:
        """The batch's image placeholders and prompt turns, read from the device once (nothing after this waits on
        the device), the placeholders checked against the images before any of them is encoded."""
        placeholders = placeholder_mask(self, input_ids, inputs_embeds)
        # A 2D mask spans the past and present tokens; a 4D one (static caches build it) the whole cache
        spans_sequence = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        if spans_sequence and attention_mask.shape[-1] != placeholders.shape[1]:
            raise ValueError(
                f"The images came with {placeholders.shape[1]} tokens and an attention mask over "
                f"{attention_mask.shape[-1]}: images cannot continue a cached sequence, since Vision Remember reads "
                "their turn's whole prompt in the forward that encodes them. Pass the whole conversation with all its "
                "images in one forward, or generate() from it."
            )
        turns = PromptTurns.read(self.config, placeholders, input_ids, attention_mask, labels, prompt_mask)
        counts = self.image_token_counts(pixel_values, **kwargs) if images is None else images.token_counts()
        check_image_tokens(turns.placeholders, counts)
        return turns

    def run_stand_in_image(self, batch_size: int, kwargs: dict) -> torch.Tensor:
        """A training batch without images runs the vision path anyway, on a stand-in image and with zero weight, in
        the order a batch with images runs it: every rank then uses every parameter in the same order on every step,
        as DDP without its unused-parameter search and DeepSpeed ZeRO-3 (whose ranks gather each module's weights
        together) need. Sets the blocks' stand-in context; returns the zero to add to the decoder's output."""
        images = self.encode_images(**self.stand_in_image())
        zero = images.zero()
        if self.vision_remember is not None:
            placeholders = torch.zeros(batch_size, 1, dtype=torch.bool)
            placeholders[0, 0] = True  # one stand-in token, where the first sample starts; its updates are zero
            pooled = placeholders if self.vision_remember.text_guidance else None
            layout = TokenLayout.from_turns(
                placeholders, torch.zeros(placeholders.shape, dtype=torch.long), pooled, zero.device
            )
            features, windows = images.remember_features[:1], [images.window_index[0][:1]]
            kwargs["vision_remember"] = self.vision_remember.prepare(layout, features, windows, stand_in=zero)
        return zero


class QwenVLImagesMixin:
    """The image inputs of Transformers' Qwen-VL models, for `VisionRememberModelMixin`: patches with their
    `image_grid_thw`, laid out merge unit after merge unit, each unit (2x2 patches) merged into one vision token."""

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **kwargs):
        """`get_image_features`, called as the native forward calls it."""
        return self.get_image_features(pixel_values, image_grid_thw, return_dict=True)

    def image_token_counts(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor, **kwargs) -> list[int]:
        return (image_grid_thw.prod(dim=-1) // self.visual.spatial_merge_unit).tolist()

    def merge_unit_windows(self, pooler_output) -> list[torch.Tensor]:
        """Per image, each vision token's window: the rows of the image's patches (in token order) its unit holds."""
        unit = self.visual.spatial_merge_unit
        return [torch.arange(len(tokens) * unit).view(-1, unit) for tokens in pooler_output]

    def stand_in_image(self) -> dict:
        """A blank image of one vision token: one merge unit of patches."""
        vision, device = self.config.vision_config, self.device
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixel_values = torch.zeros(self.visual.spatial_merge_unit, patch, device=device, dtype=self.visual.dtype)
        merge = vision.spatial_merge_size
        return {"pixel_values": pixel_values, "image_grid_thw": torch.tensor([[1, merge, merge]], device=device)}


class VisionRememberForConditionalGenerationMixin(VisionRememberPreTrainedMixin):
    """The head: hands trainers' labels to the model, keeps generated text out of the text-guided token, and regroups
    the Vision Remember features with the images when generation expands samples into beams or returned sequences."""

    def hand_labels_to_model(self):
        """Call in `__init__`. Trainers with a fused LM head call `self.model` without `labels`: hand them over, so
        the text-guided token still never pools an answer."""
        self.register_forward_pre_hook(keep_caller_labels, with_kwargs=True)
        self.register_forward_hook(forget_caller_labels, with_kwargs=True, always_call=True)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`, with the prompt pinned (`prompt_mask`): generated text never feeds Vision
        Remember, whatever the cache, the decoding strategy or an assistant's candidate tokens. A prompt longer
        than the decoder's context is refused."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        context = self.config.get_text_config().max_position_embeddings
        if prompt is not None and prompt.shape[1] > context:
            raise ValueError(
                f"The prompt holds {prompt.shape[1]} tokens, past the model's context of {context} "
                "(text_config.max_position_embeddings; each image counts one token per vision token): shorten it."
            )
        pre_encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if kwargs.get("pixel_values") is None and pre_encoded is None:
            return super().generate(inputs, **kwargs)
        generation_config = kwargs.get("generation_config") or self.generation_config
        for setting, reason in REFUSED_WITH_IMAGES.items():
            if kwargs.get(setting) or getattr(generation_config, setting, None):
                raise ValueError(f"Vision Remember cannot generate with {setting}: {reason}")
        if pre_encoded is None:  # generation encodes the images before its first forward: check them before that
            rest = {key: value for key, value in kwargs.items() if key not in ("input_ids", "inputs_embeds")}
            self.model.read_turns(input_ids, kwargs.get("inputs_embeds"), rest.pop("pixel_values"), None, rest)
        if "prompt_mask" not in kwargs and prompt is not None:
            attention_mask = kwargs.get("attention_mask")
            kwargs["prompt_mask"] = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(prompt.shape[:2], dtype=torch.bool, device=prompt.device)
            )
        return super().generate(inputs, **kwargs)

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output: dict, expand_size: int = 1, **kwargs) -> dict:
        """Generation regroups `pooler_output` per sample for each beam or returned sequence: regroup the Vision
        Remember features the same way. Markers in place of `pooler_output` (same lengths, filled with the image's
        index) say where each image went."""
        image = mm_encoder_output.get("image")
        if not isinstance(image, RememberImageOutputs):
            return super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, **kwargs)
        pooled = list(image.pooler_output)
        image.pooler_output = [torch.full((len(tokens),), index) for index, tokens in enumerate(pooled)]
        mm_encoder_output = super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, **kwargs)
        order = [int(marker[0]) for marker in image.pooler_output]
        image.pooler_output = pooled
        image.select_images(order)
        return mm_encoder_output

    def _validate_model_kwargs(self, model_kwargs: dict):
        """A native head's forward takes `prompt_mask` through `**kwargs` and hands it to `self.model`."""
        model_kwargs.pop("prompt_mask", None)
        super()._validate_model_kwargs(model_kwargs)


__all__ = [
    "RememberImageOutputs",
    "VisionRememberForConditionalGenerationMixin",
    "VisionRememberModelMixin",
    "capture_hidden_states",
    "placeholder_mask",
]
