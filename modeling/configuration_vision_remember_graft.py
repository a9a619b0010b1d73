"""What the configs of native Transformers VLMs with Vision Remember grafted on share."""

from dataclasses import fields

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .configuration_vision_remember_settings import VisionRememberSettings


@strict
class VisionRememberGraftConfig(VisionRememberSettings):
    r"""
    The config of a grafted model. A backbone's config subclasses this and the native config, e.g.
    `class VisionRememberQwen2_5_VLConfig(VisionRememberGraftConfig, Qwen2_5_VLConfig)`: every native field keeps its
    meaning, and the fields of [`VisionRememberSettings`] are added.

    `vision_feature_layers` index the vision encoder's hidden states as `output_hidden_states` counts them: 0 is the
    patch embeddings, `i` the output of encoder layer `i` (counting from 1). Only full-resolution states can be used
    (see `max_vision_feature_layer`); the default is the paper's rule scaled to them, as for LLaVA-VR.
    """

    backbone_model_type = None  # the `model_type` of the native config this one extends
    remote_code_files = None  # (configuration module, modeling module) for the `auto_map`

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.remote_code_files is not None:  # this code's own files
            configuration, modeling = self.remote_code_files
            name = type(self).__name__.removesuffix("Config")
            self.auto_map = {
                **(getattr(self, "auto_map", None) or {}),
                "AutoConfig": f"{configuration}.{type(self).__name__}",
                "AutoModel": f"{modeling}.{name}Model",
                "AutoModelForImageTextToText": f"{modeling}.{name}ForConditionalGeneration",
            }

    @classmethod
    def graft_fields(cls) -> list[str]:
        """The fields this class adds to the native config: what stripping Vision Remember removes."""
        native_class = next(
            base
            for base in cls.__mro__
            if issubclass(base, PreTrainedConfig) and not issubclass(base, VisionRememberSettings)
        )
        native = {field.name for field in fields(native_class)}
        return [field.name for field in fields(cls) if field.name not in native]

    @property
    def max_vision_feature_layer(self) -> int:
        """The last vision hidden state at full patch resolution."""
        raise NotImplementedError

    def validate_vision_remember_graft(self):
        """Part of `@strict` validation: every error names the field and how to fix it."""
        last = self.max_vision_feature_layer
        for index in self.vision_feature_layers or []:
            if not 0 <= index <= last:
                raise ValueError(
                    f"vision_feature_layers has index {index}: use hidden-state indices in [0, {last}] (0 is the "
                    "patch embeddings, i the output of the i-th encoder layer; later ones are not at full patch "
                    "resolution)."
                )


__all__ = ["VisionRememberGraftConfig"]
