"""Vision Remember model configuration."""

from typing import Literal

# First: importing it checks the Transformers version, before this file imports anything newer from Transformers.
from .configuration_vision_remember_settings import VisionRememberSettings


# isort: split
from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec


PROJECTOR_TYPES = ("avg_pool", "pixel_shuffle", "perceiver", "ldpv2", "tokenpacker")
REFUSION_TYPES = ("vision_remember", "deepstack", "sva")
# Qwen2's `<|im_start|>assistant\n`: the generation prompt of the ChatML template the default tokenizer uses.
QWEN2_GENERATION_PROMPT_IDS = [151644, 77091, 198]


@strict
class VisionRememberConfig(VisionRememberSettings):
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
            One of `"avg_pool"`, `"pixel_shuffle"`, `"perceiver"`, `"ldpv2"`, `"tokenpacker"`. The Perceiver
            resampler's tokens are learned queries over the whole image, with no patch window of their own: it needs
            `interaction="global"`. TokenPacker's point queries cross-attend to their window of the multi-level
            features (`vision_feature_layers`, the last of them downsampled to the points).
        downsample_factor (`int`, *optional*, defaults to 3):
            Side `s` of the patch window each vision token summarises: compression ratio `1/s**2` (2, 3, 4 give the
            paper's 1/4, 1/9, 1/16).
        projector_feature_layer (`int`, *optional*, defaults to -1):
            Index into the vision tower's `hidden_states` fed to the projector.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"default"` drops the first (CLS) token of the vision tower's output, `"full"` keeps every token.
        perceiver_num_layers (`int`, *optional*, defaults to 2):
            Cross-attention layers of the Perceiver resampler.
        image_grid_pinpoints (`list`, *optional*):
            AnyRes resolutions `[height, width]` as in LLaVA-NeXT. `None` turns AnyRes off: one view per image.
        use_vision_remember (`bool`, *optional*, defaults to `True`):
            Build the Vision Remember blocks. `False` gives the plain compressed baseline, whose Vision Remember
            settings are then not checked.
        vision_feature_layers (`list[int]`, *optional*, defaults to `[7, 15, 23]` for a 24-layer tower):
            Vision tower `hidden_states` concatenated into the multi-level features; the default is the ends of the
            tower's thirds.
        refusion (`str`, *optional*, defaults to `"vision_remember"`):
            What the blocks after `remember_after_layers` are: Vision Remember's (`"vision_remember"`), or a re-fusion
            method the paper compares it with, reading the same windows of the same multi-level features:
            `"deepstack"`, Qwen3-VL's DeepStack (each level's windows stacked and merged by an MLP of its own, added
            to the vision tokens; the levels are spread over the blocks in equal shares), or `"sva"`, Cambrian-1's
            Spatial Vision Aggregator (the vision tokens cross-attend to their windows of every level through key and
            value projections of each level's own, with `self_attention_heads` heads). Both need
            `interaction="local"`; `bidirectional` and `text_guidance` are Vision Remember's only.
        fastv_layer (`int`, *optional*):
            FastV, the token-pruning method the paper compares Vision Remember with (instead of it: needs
            `use_vision_remember=False`): decoder layer `fastv_layer - 1` ranks each turn's vision tokens by the
            attention its prompt's last token pays them, and from layer `fastv_layer` on only the
            `fastv_keep_ratio` most attended remain visible. `None` (the default) turns it off. Needs
            `attn_implementation` `"sdpa"` or `"eager"`, which take the 4-D masks it prunes with.
        fastv_keep_ratio (`float`, *optional*, defaults to 0.5):
            The fraction of each turn's vision tokens FastV keeps (FastV's own default prunes half).
        generation_prompt_ids (`list[int]`, *optional*, defaults to Qwen2's `<|im_start|>assistant\n`):
            See [`VisionRememberSettings`].

    The other Vision Remember fields (`remember_after_layers`, `interaction`, ...) are those of
    [`VisionRememberSettings`].
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
    perceiver_num_layers: int = 2
    image_grid_pinpoints: list | None = None
    use_vision_remember: bool = True
    refusion: str = "vision_remember"
    fastv_layer: int | None = None
    fastv_keep_ratio: float = 0.5
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.generation_prompt_ids is None:
            self.generation_prompt_ids = list(QWEN2_GENERATION_PROMPT_IDS)
        super().__post_init__(**kwargs)
        # This code's own files, also where a checkpoint saved by older code named others
        self.auto_map = {
            **(getattr(self, "auto_map", None) or {}),
            "AutoConfig": "configuration_llava_vr.VisionRememberConfig",
            "AutoModel": "modeling_llava_vr.VisionRememberModel",
            "AutoModelForImageTextToText": "modeling_llava_vr.VisionRememberForConditionalGeneration",
        }

    @property
    def projector_feature_layers(self) -> list[int]:
        """The vision hidden states the projector reads, concatenated on the channels."""
        if self.projector_type == "tokenpacker":
            return self.vision_feature_layers
        return [self.projector_feature_layer]

    @property
    def max_vision_feature_layer(self) -> int:
        return self.vision_config.num_hidden_layers

    @property
    def has_vision_remember(self) -> bool:
        return self.use_vision_remember

    @property
    def grid_size(self) -> int:
        """Patches per side of one view in the vision tower."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_side(self) -> int:
        """Vision tokens per side of one view after the projector."""
        return self.grid_size // self.downsample_factor

    def validate_llava_vr(self):
        """Part of `@strict` validation: every error names the field and how to fix it."""
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type={self.projector_type!r} is unknown: use one of {PROJECTOR_TYPES}.")
        if self.projector_type == "perceiver" and self.use_vision_remember and self.interaction != "global":
            raise ValueError(
                f"interaction={self.interaction!r} gives each vision token the patches it was compressed from, but "
                "the Perceiver resampler's tokens are learned queries over the whole image, not any patch window of "
                "it: use interaction='global' (each token attends to its whole image)."
            )
        if self.refusion not in REFUSION_TYPES:
            raise ValueError(f"refusion={self.refusion!r} is unknown: use one of {REFUSION_TYPES}.")
        if self.use_vision_remember and self.refusion != "vision_remember":
            self.check_rival_refusion()
        if self.fastv_layer is not None:
            self.check_fastv()
        if self.downsample_factor < 1 or self.grid_size % self.downsample_factor:
            raise ValueError(
                f"downsample_factor={self.downsample_factor} does not tile the {self.grid_size}x{self.grid_size} "
                f"feature map (image_size {self.vision_config.image_size} / patch_size "
                f"{self.vision_config.patch_size}): choose a divisor of {self.grid_size}."
            )
        num_vision_states = self.vision_config.num_hidden_layers + 1
        indices = {"projector_feature_layer": [self.projector_feature_layer]}
        if self.use_vision_remember or self.projector_type == "tokenpacker":
            indices["vision_feature_layers"] = self.vision_feature_layers
        for name, values in indices.items():
            for index in values:
                if not -num_vision_states <= index < num_vision_states:
                    raise ValueError(
                        f"{name} has index {index}, out of range for a vision tower with {num_vision_states} hidden "
                        f"states (embeddings + {num_vision_states - 1} layers): use indices in "
                        f"[{-num_vision_states}, {num_vision_states - 1}]."
                    )

    def check_rival_refusion(self):
        """Part of `validate_llava_vr` (`@strict` runs every method named `validate_*` on every config)."""
        if self.interaction != "local":
            raise ValueError(
                f"refusion={self.refusion!r} reads each vision token's window of features, which "
                f"interaction={self.interaction!r} does not give it: use interaction='local'."
            )
        levels, blocks = len(self.remember_feature_layers), len(self.remember_after_layers)
        if self.refusion == "deepstack" and levels % blocks:
            raise ValueError(
                f"refusion='deepstack' spreads the {levels} feature levels over the blocks after "
                f"remember_after_layers={self.remember_after_layers} in equal shares, and {blocks} blocks do not "
                f"divide them: list as many layers as levels (Qwen3-VL's one level per layer), or a divisor of "
                f"{levels}."
            )

    def check_fastv(self):
        """Part of `validate_llava_vr`."""
        layers = self.text_config.num_hidden_layers
        if not 1 <= self.fastv_layer < layers:
            raise ValueError(
                f"fastv_layer={self.fastv_layer}: FastV ranks the vision tokens in the layer before fastv_layer and "
                f"prunes them from fastv_layer on, which needs a layer in [1, {layers - 1}] of this {layers}-layer "
                "decoder."
            )
        if not 0 < self.fastv_keep_ratio <= 1:
            raise ValueError(f"fastv_keep_ratio={self.fastv_keep_ratio} is not a fraction in (0, 1] of the tokens.")
        if self.use_vision_remember:
            raise ValueError(
                "fastv_layer is set with use_vision_remember=True: FastV is the token-pruning method Vision Remember "
                "is compared with, in its place: set use_vision_remember=False."
            )


__all__ = ["VisionRememberConfig"]
