"""Vision Remember model configuration."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


PROJECTOR_TYPES = ("avg_pool", "pixel_shuffle", "perceiver", "ldpv2")
INTERACTION_TYPES = ("local", "deformable", "global")


@strict
class VisionRememberConfig(PreTrainedConfig):
    r"""
    Configuration of a LLaVA-style model with Vision Remember: a vision tower, an efficient projector that compresses
    its features by `downsample_factor**2`, and a decoder-only language model whose vision tokens are rewritten, after
    a few decoder layers, from the uncompressed multi-level vision features.

    Layer indices are 0-based. The paper's "after the 1st and 4th layer" is `remember_after_layers=[0, 3]`; its
    "features of layers 8, 16 and 24" are `vision_feature_layers=[7, 15, 23]`, indices into the vision tower's
    `hidden_states` tuple.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Vision tower config (SigLIP-L/16-384 sized by default). Any vision model returning `hidden_states` works.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Decoder config (Qwen2-0.5B sized by default). Any decoder-only model with `.layers` works.
        image_token_id (`int`, *optional*, defaults to 151655):
            Id of the placeholder token that vision tokens replace (Qwen2-VL's `<|image_pad|>`).
        projector_type (`str`, *optional*, defaults to `"avg_pool"`):
            One of `"avg_pool"`, `"pixel_shuffle"`, `"perceiver"`, `"ldpv2"`.
        downsample_factor (`int`, *optional*, defaults to 3):
            Side `s` of the patch window each vision token summarises: compression ratio `1/s**2` (2, 3, 4 give the
            paper's 1/4, 1/9, 1/16).
        projector_feature_layer (`int`, *optional*, defaults to -1):
            Index into the vision tower's `hidden_states` fed to the projector.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"default"` drops the first (CLS) token of the vision tower's output, `"full"` keeps every token.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the projector and Vision Remember MLPs.
        perceiver_num_layers (`int`, *optional*, defaults to 2):
            Cross-attention layers of the Perceiver resampler.
        image_grid_pinpoints (`list`, *optional*):
            AnyRes resolutions `[height, width]` as in LLaVA-NeXT. `None` turns AnyRes off: one view per image.
        use_vision_remember (`bool`, *optional*, defaults to `True`):
            Build the Vision Remember blocks. `False` gives the plain compressed baseline.
        remember_after_layers (`list[int]`, *optional*, defaults to `[0, 3]`):
            Decoder layers after which the vision tokens are rewritten.
        vision_feature_layers (`list[int]`, *optional*, defaults to `[7, 15, 23]`):
            Vision tower `hidden_states` concatenated into the multi-level features.
        multi_level (`bool`, *optional*, defaults to `True`):
            Use all of `vision_feature_layers`; `False` keeps only the last of them.
        interaction (`str`, *optional*, defaults to `"local"`):
            Token-feature cross-attention over the token's own `s x s` window (`"local"`), over points sampled at
            learned offsets inside it (`"deformable"`), or over every feature of the image (`"global"`).
        deformable_points (`int`, *optional*, defaults to 4):
            Sampling points per token for `"deformable"`.
        bidirectional (`bool`, *optional*, defaults to `True`):
            Add the token bidirectional self-attention sub-layer.
        text_guidance (`bool`, *optional*, defaults to `True`):
            Add the text-guided token (a max-pool over the prompt's hidden states) to the self-attention.
        cross_attention_heads (`int`, *optional*, defaults to 8):
            Heads of the token-feature cross-attention; must divide the multi-level feature width.
        self_attention_heads (`int`, *optional*):
            Heads of the bidirectional self-attention; defaults to the decoder's.
        identity_init (`bool`, *optional*, defaults to `True`):
            Zero the output projection of every sub-layer, so a new model reproduces the model without them.
    """

    model_type = "vision_remember"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="qwen2",
            init_kwargs={
                "vocab_size": 151936,
                "hidden_size": 896,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "max_position_embeddings": 32768,
                "rope_theta": 1000000.0,
                "tie_word_embeddings": True,
            },
        ),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 16,
                "vision_use_head": False,
            },
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    projector_type: str = "avg_pool"
    downsample_factor: int = 3
    projector_feature_layer: int = -1
    vision_feature_select_strategy: Literal["default", "full"] = "full"
    projector_hidden_act: str = "gelu"
    perceiver_num_layers: int = 2
    image_grid_pinpoints: list | None = None
    use_vision_remember: bool = True
    remember_after_layers: list[int] | None = None
    vision_feature_layers: list[int] | None = None
    multi_level: bool = True
    interaction: str = "local"
    deformable_points: int = 4
    bidirectional: bool = True
    text_guidance: bool = True
    cross_attention_heads: int = 8
    self_attention_heads: int | None = None
    identity_init: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.remember_after_layers is None:
            self.remember_after_layers = [0, 3]
        if self.vision_feature_layers is None:
            self.vision_feature_layers = [7, 15, 23]
        if self.self_attention_heads is None:
            self.self_attention_heads = self.text_config.num_attention_heads
        if getattr(self, "auto_map", None) is None:
            self.auto_map = {
                "AutoConfig": "configuration_vision_remember.VisionRememberConfig",
                "AutoModel": "modeling_vision_remember.VisionRememberModel",
                "AutoModelForImageTextToText": "modeling_vision_remember.VisionRememberForConditionalGeneration",
            }

    @property
    def grid_size(self) -> int:
        """Patches per side of one view in the vision tower."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Vision tokens per side of one view after the projector."""
        return self.grid_size // self.downsample_factor

    @property
    def remember_feature_layers(self) -> list[int]:
        return self.vision_feature_layers if self.multi_level else self.vision_feature_layers[-1:]

    @property
    def remember_feature_size(self) -> int:
        """Width `L * Dv` of the multi-level features the vision tokens attend to."""
        return len(self.remember_feature_layers) * self.vision_config.hidden_size

    def validate_vision_remember(self):
        """Part of `@strict` validation: every error names the field and how to fix it."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={self.projector_type!r} is unknown: use one of {PROJECTOR_TYPES}.")
        if self.downsample_factor < 1 or self.grid_size % self.downsample_factor:
            raise ValueError(
                f"downsample_factor={self.downsample_factor} does not tile the {self.grid_size}x{self.grid_size} "
                f"feature map (image_size {self.vision_config.image_size} / patch_size "
                f"{self.vision_config.patch_size}): choose a divisor of {self.grid_size}."
            )
        num_vision_states = self.vision_config.num_hidden_layers + 1
        for name in ("vision_feature_layers", "projector_feature_layer"):
            indices = getattr(self, name)
            for index in indices if isinstance(indices, list) else [indices]:
                if not -num_vision_states <= index < num_vision_states:
                    raise ValueError(
                        f"{name} has index {index}, out of range for a vision tower with {num_vision_states} hidden "
                        f"states (embeddings + {num_vision_states - 1} layers): use indices in "
                        f"[{-num_vision_states}, {num_vision_states - 1}]."
                    )
        check_vision_remember_settings(self)


def check_vision_remember_settings(config):
    """The checks every config with Vision Remember shares, whatever its backbone: the layers it runs after, its
    interaction, its head counts."""
    if config.interaction not in INTERACTION_TYPES:
        raise ValueError(f"interaction={config.interaction!r} is unknown: use one of {INTERACTION_TYPES}.")
    if not config.vision_feature_layers:
        raise ValueError("vision_feature_layers is empty: give at least one vision hidden-state index.")
    if not config.remember_after_layers:
        raise ValueError("remember_after_layers is empty: give at least one 0-based decoder layer index.")
    last = config.text_config.num_hidden_layers - 1
    for index in config.remember_after_layers:
        if not 0 <= index < last:
            raise ValueError(
                f"remember_after_layers has index {index}, out of range for a decoder with {last + 1} layers: use "
                f"0-based indices in [0, {last - 1}] (after the last layer, vision tokens reach no text token)."
            )
    if len(set(config.remember_after_layers)) != len(config.remember_after_layers):
        raise ValueError(f"remember_after_layers={config.remember_after_layers} repeats a layer: list each once.")
    if config.remember_feature_size % config.cross_attention_heads:
        raise ValueError(
            f"cross_attention_heads={config.cross_attention_heads} does not divide the multi-level feature width "
            f"{config.remember_feature_size}: choose a divisor."
        )
    if config.text_config.hidden_size % config.self_attention_heads:
        raise ValueError(
            f"self_attention_heads={config.self_attention_heads} does not divide the decoder width "
            f"{config.text_config.hidden_size}: choose a divisor."
        )
    if config.deformable_points < 1:
        raise ValueError(f"deformable_points={config.deformable_points} must be at least 1.")


__all__ = ["VisionRememberConfig"]
