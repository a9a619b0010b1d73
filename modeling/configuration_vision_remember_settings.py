"""The Vision Remember settings every model with Vision Remember shares, whatever its backbone.

Every config of a model with Vision Remember imports this module first: it refuses, with the fix, a Transformers older
than the oldest release these files are tested with, before anything they import from Transformers can fail less
clearly.
"""

import difflib
import re
from dataclasses import fields

import transformers
from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig


MINIMUM_TRANSFORMERS = "5.23.0"


def release(version: str) -> tuple[int, ...]:
    return tuple(int(number) for number in re.findall(r"\d+", version)[:3])


if release(transformers.__version__) < release(MINIMUM_TRANSFORMERS):
    raise ImportError(
        f"Models with Vision Remember need Transformers {MINIMUM_TRANSFORMERS} or newer, and this is "
        f"{transformers.__version__}: pip install --upgrade 'transformers>={MINIMUM_TRANSFORMERS}'"
    )


INTERACTION_TYPES = ("local", "deformable", "global")
FLASH_MAX_HEAD_DIM = 256  # FlashAttention's largest head_dim
TRITON_WINDOWS = "vision_remember_triton"  # the attn_implementation that runs the windowed attention as one kernel


@strict
class VisionRememberSettings(PreTrainedConfig):
    r"""
    The Vision Remember fields of a config. LLaVA-VR's [`VisionRememberConfig`] and the configs of native VLMs with
    Vision Remember grafted on subclass it.

    Layer indices are 0-based. The paper's "after the 1st and 4th layer" is `remember_after_layers=[0, 3]`.

    Args:
        remember_after_layers (`list[int]`, *optional*, defaults to `[0, 3]`):
            Decoder layers after which the vision tokens are rewritten.
        vision_feature_layers (`list[int]`, *optional*):
            Vision hidden states (0 is the patch embeddings, `i` the output of encoder layer `i`) concatenated into
            the multi-level features. Defaults to the paper's `[7, 15, 23]` of 24 layers, scaled to the encoder's
            depth.
        multi_level (`bool`, *optional*, defaults to `True`):
            Use all of `vision_feature_layers`; `False` keeps only the last of them.
        interaction (`str`, *optional*, defaults to `"local"`):
            Token-feature cross-attention over the features each token was compressed from (`"local"`), over points
            sampled at learned offsets inside them (`"deformable"`), or over every feature of its image (`"global"`).
        deformable_points (`int`, *optional*, defaults to 4):
            Sampling points per token for `"deformable"`.
        bidirectional (`bool`, *optional*, defaults to `True`):
            Add the token bidirectional self-attention sub-layer.
        text_guidance (`bool`, *optional*, defaults to `True`):
            Add the text-guided token (a max-pool over the prompt's hidden states) to the self-attention.
        cross_attention_heads (`int`, *optional*):
            Heads of the token-feature cross-attention; must divide the multi-level feature width. Defaults to the
            fewest heads, at least 8, whose head_dim FlashAttention can run (at most 256): 12 for 3 x 1024 features.
        self_attention_heads (`int`, *optional*):
            Heads of the bidirectional self-attention; defaults to the decoder's.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLPs (the one that expands each token into a cross-attention query, and LLaVA-VR's
            projector).
        identity_init (`bool`, *optional*, defaults to `True`):
            Zero the output projection of every sub-layer, so a new model reproduces the model without Vision Remember.
        generation_prompt_ids (`list[int]`, *optional*):
            The token ids the chat template's generation prompt adds (e.g. `<|im_start|>assistant\n`). Where a forward
            pass gets neither `labels` nor `prompt_mask`, the prompt of each sample ends after its last occurrence,
            so that a continuation scored after it never feeds the text-guided token.
    """

    remember_after_layers: list[int] | None = None
    vision_feature_layers: list[int] | None = None
    multi_level: bool = True
    interaction: str = "local"
    deformable_points: int = 4
    bidirectional: bool = True
    text_guidance: bool = True
    cross_attention_heads: int | None = None
    self_attention_heads: int | None = None
    projector_hidden_act: str = "gelu"
    identity_init: bool = True
    generation_prompt_ids: list[int] | None = None

    def __post_init__(self, **kwargs):
        refuse_misspelled_settings(type(self), kwargs)
        super().__post_init__(**kwargs)
        if self.remember_after_layers is None:
            self.remember_after_layers = [0, 3]
        if self.vision_feature_layers is None:
            self.vision_feature_layers = self.default_vision_feature_layers()
        if self.self_attention_heads is None:
            self.self_attention_heads = self.text_config.num_attention_heads
        if self.cross_attention_heads is None:
            width = self.remember_feature_size
            fitting = (
                heads for heads in range(8, width + 1) if width % heads == 0 and width // heads <= FLASH_MAX_HEAD_DIM
            )
            self.cross_attention_heads = next(fitting, 8)

    def default_vision_feature_layers(self) -> list[int]:
        """The paper's `[7, 15, 23]` of a 24-layer SigLIP (its "layers 8, 16 and 24", counting the hidden states from
        1), scaled to the encoder's depth: the ends of its thirds."""
        depth = self.max_vision_feature_layer
        return sorted({max(0, depth * part // 3 - 1) for part in (1, 2, 3)})

    @property
    def max_vision_feature_layer(self) -> int:
        """The last vision hidden state the multi-level features can read."""
        raise NotImplementedError

    @property
    def has_vision_remember(self) -> bool:
        """Whether the model builds the blocks; the settings of a model without them are not checked."""
        return True

    @property
    def remember_feature_layers(self) -> list[int]:
        return self.vision_feature_layers if self.multi_level else self.vision_feature_layers[-1:]

    @property
    def remember_feature_size(self) -> int:
        """Width `L * Dv` of the multi-level features the vision tokens attend to."""
        return len(self.remember_feature_layers) * self.vision_config.hidden_size

    def validate_vision_remember_settings(self):
        """Part of `@strict` validation: every error names the field and how to fix it."""
        if not self.has_vision_remember:
            return
        if self.interaction not in INTERACTION_TYPES:
            raise ValueError(f"interaction={self.interaction!r} is unknown: use one of {INTERACTION_TYPES}.")
        if not self.vision_feature_layers:
            raise ValueError("vision_feature_layers is empty: give at least one vision hidden-state index.")
        if not self.remember_after_layers:
            raise ValueError("remember_after_layers is empty: give at least one 0-based decoder layer index.")
        last = self.text_config.num_hidden_layers - 1
        for index in self.remember_after_layers:
            if not 0 <= index < last:
                raise ValueError(
                    f"remember_after_layers has index {index}, out of range for a decoder with {last + 1} layers: use "
                    f"0-based indices in [0, {last - 1}] (after the last layer, vision tokens reach no text token)."
                )
        if len(set(self.remember_after_layers)) != len(self.remember_after_layers):
            raise ValueError(f"remember_after_layers={self.remember_after_layers} repeats a layer: list each once.")
        if self.remember_feature_size % self.cross_attention_heads:
            raise ValueError(
                f"cross_attention_heads={self.cross_attention_heads} does not divide the multi-level feature width "
                f"{self.remember_feature_size}: choose a divisor."
            )
        if self.text_config.hidden_size % self.self_attention_heads:
            raise ValueError(
                f"self_attention_heads={self.self_attention_heads} does not divide the decoder width "
                f"{self.text_config.hidden_size}: choose a divisor."
            )
        if self.deformable_points < 1:
            raise ValueError(f"deformable_points={self.deformable_points} must be at least 1.")
        if self.generation_prompt_ids is not None and not self.generation_prompt_ids:
            raise ValueError("generation_prompt_ids is empty: give the generation prompt's token ids, or None.")


def refuse_misspelled_settings(config_class: type, unknown: dict):
    """A keyword the config does not know that is one typo from one of its own settings (not those every Transformers
    config has) would otherwise be kept as a plain attribute, and the setting's default used in its place."""
    common = {field.name for field in fields(PreTrainedConfig)}
    settings = [field.name for field in fields(config_class) if field.name not in common]
    for key in unknown:
        closest = difflib.get_close_matches(key, settings, n=1, cutoff=0.8)
        if closest:
            raise ValueError(f"{key!r} is not a setting of {config_class.__name__}: did you mean {closest[0]!r}?")


__all__ = ["VisionRememberSettings"]
