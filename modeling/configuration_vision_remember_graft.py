"""Vision Remember settings shared by the configs of native Transformers VLMs with Vision Remember grafted on."""

from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_vision_remember import check_vision_remember_settings


@strict
class VisionRememberGraftConfig(PreTrainedConfig):
    r"""
    The Vision Remember settings of a grafted model. A backbone's config subclasses this and the native config, e.g.
    `class VisionRememberQwen2_5_VLConfig(VisionRememberGraftConfig, Qwen2_5_VLConfig)`: every native field keeps its
    meaning, and these are added.

    Layer indices are 0-based. The paper's "after the 1st and 4th layer" is `remember_after_layers=[0, 3]`.
    `vision_feature_layers` index the vision encoder's hidden states as `output_hidden_states` counts them: 0 is the
    patch embeddings, `i` the output of encoder layer `i - 1`. Only full-resolution states can be used (see
    `max_vision_feature_layer`).

    Args:
        remember_after_layers (`list[int]`, *optional*, defaults to `[0, 3]`):
            Decoder layers after which the vision tokens are rewritten.
        vision_feature_layers (`list[int]`, *optional*):
            Vision hidden states concatenated into the multi-level features. Defaults to the ends of the thirds of the
            full-resolution encoder layers.
        multi_level (`bool`, *optional*, defaults to `True`):
            Use all of `vision_feature_layers`; `False` keeps only the last of them.
        interaction (`str`, *optional*, defaults to `"local"`):
            Token-feature cross-attention over the patch block each token was merged from (`"local"`), over points
            sampled at learned offsets inside it (`"deformable"`), or over every patch of the image (`"global"`).
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
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the MLP that expands each token into a cross-attention query.
        identity_init (`bool`, *optional*, defaults to `True`):
            Zero the output projection of every sub-layer, so the grafted model reproduces the original one.
    """

    backbone_model_type = None  # the `model_type` of the native config this one extends
    remote_code_files = None  # (configuration module, modeling module) for the `auto_map`

    remember_after_layers: list[int] | None = None
    vision_feature_layers: list[int] | None = None
    multi_level: bool = True
    interaction: str = "local"
    deformable_points: int = 4
    bidirectional: bool = True
    text_guidance: bool = True
    cross_attention_heads: int = 8
    self_attention_heads: int | None = None
    projector_hidden_act: str = "gelu"
    identity_init: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.remember_after_layers is None:
            self.remember_after_layers = [0, 3]
        if self.vision_feature_layers is None:
            full = self.max_vision_feature_layer
            self.vision_feature_layers = sorted({max(1, full * part // 3) for part in (1, 2, 3)})
        if self.self_attention_heads is None:
            self.self_attention_heads = self.text_config.num_attention_heads
        if getattr(self, "auto_map", None) is None and self.remote_code_files is not None:
            configuration, modeling = self.remote_code_files
            name = type(self).__name__.removesuffix("Config")
            self.auto_map = {
                "AutoConfig": f"{configuration}.{type(self).__name__}",
                "AutoModel": f"{modeling}.{name}Model",
                "AutoModelForImageTextToText": f"{modeling}.{name}ForConditionalGeneration",
            }

    @classmethod
    def graft_fields(cls) -> list[str]:
        """The fields this class adds to the native config: what stripping Vision Remember removes."""
        native = {field.name for field in fields(PreTrainedConfig)}
        return [field.name for field in fields(VisionRememberGraftConfig) if field.name not in native]

    @property
    def max_vision_feature_layer(self) -> int:
        """The last vision hidden state at full patch resolution."""
        raise NotImplementedError

    @property
    def remember_feature_layers(self) -> list[int]:
        return self.vision_feature_layers if self.multi_level else self.vision_feature_layers[-1:]

    @property
    def remember_feature_size(self) -> int:
        """Width `L * Dv` of the multi-level features the vision tokens attend to."""
        return len(self.remember_feature_layers) * self.vision_config.hidden_size

    def validate_vision_remember_graft(self):
        """Part of `@strict` validation: every error names the field and how to fix it."""
        last = self.max_vision_feature_layer
        for index in self.vision_feature_layers or []:
            if not 0 <= index <= last:
                raise ValueError(
                    f"vision_feature_layers has index {index}: use hidden-state indices in [0, {last}] (0 is the "
                    "patch embeddings, i the output of encoder layer i - 1; later ones are not at full patch "
                    "resolution)."
                )
        check_vision_remember_settings(self)


__all__ = ["VisionRememberGraftConfig"]
