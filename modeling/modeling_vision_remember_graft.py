"""What every native VLM with Vision Remember grafted on shares: the blocks hooked after the chosen decoder layers,
the vision hidden states captured while the native vision encoder runs, the per-forward context, the weights' init.

A backbone's model subclasses `VisionRememberGraftModelMixin` and the native `...Model`, and turns its vision encoder's
hidden states into the multi-level features and each vision token's window of them; its head subclasses
`VisionRememberGraftForConditionalGenerationMixin` and the native `...ForConditionalGeneration`. The native forward
runs unchanged: the image features are computed once and handed to it as `mm_encoder_outputs`, and the Vision Remember
context reaches the decoder layers' hooks through the keyword arguments the native models forward to every layer.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .image_layout import NO_WINDOW, stack_windows
from .modeling_vision_remember import check_image_tokens, forget_caller_labels, hand_labels_to_model, prompt_mask
from .vision_remember import RememberContext, VisionRemember, init_vision_remember_weights


@dataclass
class RememberImageOutputs(BaseModelOutputWithPooling):
    r"""
    The native `get_image_features` outputs, plus what Vision Remember reads, per image like `pooler_output` (so that
    generation can regroup them per beam or returned sequence the same way):

    remember_features (`tuple(torch.FloatTensor)`, one of shape `(feature_rows, L * Dv)` per image):
        The multi-level vision features of each image.
    window_index (`tuple(torch.LongTensor)`, one of shape `(vision_tokens, window)` per image):
        Each of the image's vision tokens' rows of its `remember_features`, -1 where none.
    """

    remember_features: tuple[torch.FloatTensor, ...] | None = None
    window_index: tuple[torch.LongTensor, ...] | None = None

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images' features `(rows, L * Dv)` and every token's window of them `(tokens, widest window)`."""
        start, windows = 0, []
        for features, window in zip(self.remember_features, self.window_index):
            windows.append(torch.where(window == NO_WINDOW, NO_WINDOW, window + start))
            start += len(features)
        return torch.cat(self.remember_features), stack_windows(windows)

    def select_images(self, order: list[int]):
        """Keep images `order` (repeats allowed), in that order."""
        self.pooler_output = [self.pooler_output[index] for index in order]
        self.remember_features = tuple(self.remember_features[index] for index in order)
        self.window_index = tuple(self.window_index[index] for index in order)


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


def block_windows(height: int, width: int, side: int, device=None) -> torch.Tensor:
    """Rows of a row-major `height x width` patch grid that each `side x side` block covers, blocks in row-major order:
    `(height * width / side**2, side**2)`, each block's rows in row-major order."""
    grid = torch.arange(height * width, device=device).view(height // side, side, width // side, side)
    return grid.permute(0, 2, 1, 3).reshape(-1, side * side)


class VisionRememberGraftPreTrainedMixin:
    """Initialises the Vision Remember weights; goes first in the bases of both the model and its head."""

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_vision_remember_weights(module, self.config.identity_init)


class VisionRememberGraftModelMixin(VisionRememberGraftPreTrainedMixin):
    """Adds `vision_remember` to a native model that has a decoder at `language_model.layers`. The backbone defines
    `encode_images(pixel_values, **kwargs)`: its `get_image_features`, called with the native forward's arguments."""

    def graft_vision_remember(self):
        """Call at the end of `__init__`, after the native model is built."""
        self.caller_labels = None  # the head's `labels` when a trainer calls this module without them
        self.vision_remember = VisionRemember(self.config)
        self.vision_remember.attach(self.language_model.layers)
        self.post_init()

    def windows(self, local: list[torch.Tensor], rows_per_image: list[int]) -> tuple[torch.Tensor, ...]:
        """Each image's token windows: each token's own patch block (`local`), or, for `interaction="global"`, every
        row of the image."""
        if self.config.interaction != "global":
            return tuple(local)
        return tuple(
            torch.arange(rows, device=window.device).expand(len(window), rows)
            for window, rows in zip(local, rows_per_image)
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        prompt_length: int | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        r"""
        Takes every argument of the native model's `forward`, and:

        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Only used to keep answers out of the text-guided token. The loss is the head's.
        prompt_length (`int`, *optional*):
            Positions from `prompt_length` on are generated text and never feed the text-guided token. Set by
            `generate()`.
        """
        if pixel_values is not None and mm_encoder_outputs is None:
            mm_encoder_outputs, pixel_values = {"image": self.encode_images(pixel_values, **kwargs)}, None
        context = self.remember_context(input_ids, attention_mask, labels, prompt_length, mm_encoder_outputs)
        if context is not None:
            kwargs["vision_remember"] = context
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    def remember_context(
        self, input_ids, attention_mask, labels, prompt_length, mm_encoder_outputs: dict | None
    ) -> RememberContext | None:
        """The context the hooked blocks read when the forward pass carries images (prefill), else None."""
        image = (mm_encoder_outputs or {}).get("image")
        if image is None:
            return None
        if getattr(image, "remember_features", None) is None:
            raise ValueError(
                "mm_encoder_outputs['image'] holds no Vision Remember features: pass pixel_values, or the output of "
                "this model's own get_image_features."
            )
        if input_ids is None:
            raise ValueError(
                "Vision Remember needs input_ids with images: their image tokens mark where the vision tokens go."
            )
        image_token_id = self.config.image_token_id
        check_image_tokens(input_ids == image_token_id, [len(tokens) for tokens in image.pooler_output])
        token_batch, token_position = (input_ids == image_token_id).nonzero(as_tuple=True)
        labels = labels if labels is not None else self.caller_labels
        guidance = prompt_mask(input_ids, image_token_id, attention_mask, labels, prompt_length)
        if getattr(self.config, "video_token_id", None) is not None:
            guidance &= input_ids != self.config.video_token_id
        features, window_index = image.packed()
        return self.vision_remember.prepare(features, token_batch, token_position, window_index, guidance)


class VisionRememberGraftForConditionalGenerationMixin(VisionRememberGraftPreTrainedMixin):
    """The head: hands trainers' labels to the model, and keeps generated text out of the text-guided token."""

    def hand_labels_to_model(self):
        """Call in `__init__`. Trainers with a fused LM head call `self.model` without `labels`: hand them over, so
        the text-guided token still never pools an answer."""
        self.register_forward_pre_hook(hand_labels_to_model, with_kwargs=True)
        self.register_forward_hook(forget_caller_labels, with_kwargs=True, always_call=True)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """`GenerationMixin.generate`, with the prompt length pinned: generated text never feeds Vision Remember."""
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None and kwargs.get("pixel_values") is not None:
            kwargs.setdefault("prompt_length", input_ids.shape[1])
            generation_config = kwargs.get("generation_config") or self.generation_config
            if kwargs.get("prefill_chunk_size") or getattr(generation_config, "prefill_chunk_size", None):
                raise ValueError(
                    "Vision Remember reads the whole prompt in one prefill (its text-guided token pools all of it), "
                    "so chunked prefill cannot run it: generate with prefill_chunk_size=None."
                )
        return super().generate(inputs, **kwargs)

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output: dict, expand_size: int = 1, **kwargs) -> dict:
        """Generation encodes the images once and regroups `pooler_output` per sample for each beam or returned
        sequence: regroup the Vision Remember features the same way. Markers in place of `pooler_output` (same lengths,
        filled with the image's index) say where each image went."""
        image = mm_encoder_output.get("image")
        if getattr(image, "remember_features", None) is None:
            return super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, **kwargs)
        pooled = list(image.pooler_output)
        image.pooler_output = [torch.full((len(tokens),), index) for index, tokens in enumerate(pooled)]
        mm_encoder_output = super()._expand_multimodal_outputs(input_ids, mm_encoder_output, expand_size, **kwargs)
        order = [int(marker[0]) for marker in image.pooler_output]
        image.pooler_output = pooled
        image.select_images(order)
        return mm_encoder_output

    def _validate_model_kwargs(self, model_kwargs: dict):
        """The native head's forward takes `prompt_length` through `**kwargs` and hands it to `self.model`."""
        model_kwargs.pop("prompt_length", None)
        super()._validate_model_kwargs(model_kwargs)


__all__ = [
    "RememberImageOutputs",
    "VisionRememberGraftForConditionalGenerationMixin",
    "VisionRememberGraftModelMixin",
    "block_windows",
    "capture_hidden_states",
]
