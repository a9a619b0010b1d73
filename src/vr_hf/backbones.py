"""Every kind of vr-hf checkpoint, in one registry: LLaVA-VR, and each native Transformers VLM Vision Remember is
grafted onto.

A record says which classes make the checkpoint, which native checkpoint grafting starts from, and where the model
keeps each part that the training phases and LoRA train. Registration with the Auto classes, conversion, training,
LoRA, serving, evaluation and the tests all read it. Adding a backbone takes its two remote-code files (configuration
and modeling), one record here, and one conversion entry point (`vr_hf.conversion.graft`).

Parts are attribute paths on the `...ForConditionalGeneration` class (on a bare base model drop `model.`). A parameter
belongs to the part with the longest path that holds it: a path inside another part's path (a merger inside the
vision tower) takes its parameters out of that part.
"""

from dataclasses import dataclass, field

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)
from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

from .modeling.configuration_llava_vr import VisionRememberConfig
from .modeling.configuration_vision_remember_minicpmv4_6 import VisionRememberMiniCPMV4_6Config
from .modeling.configuration_vision_remember_qwen2_5_vl import VisionRememberQwen2_5_VLConfig
from .modeling.configuration_vision_remember_qwen3_vl import VisionRememberQwen3VLConfig
from .modeling.modeling_llava_vr import VisionRememberForConditionalGeneration, VisionRememberModel
from .modeling.modeling_vision_remember_minicpmv4_6 import (
    VisionRememberMiniCPMV4_6ForConditionalGeneration,
    VisionRememberMiniCPMV4_6Model,
)
from .modeling.modeling_vision_remember_qwen2_5_vl import (
    VisionRememberQwen2_5_VLForConditionalGeneration,
    VisionRememberQwen2_5_VLModel,
)
from .modeling.modeling_vision_remember_qwen3_vl import (
    VisionRememberQwen3VLForConditionalGeneration,
    VisionRememberQwen3VLModel,
)
from .modeling.processing_llava_vr import VisionRememberProcessor


# The parts every model keeps in the same place
SHARED_PARTS = {
    "vision_remember": ("model.vision_remember",),
    "language_model": ("model.language_model",),
    "lm_head": ("lm_head",),
}


@dataclass(frozen=True)
class Backbone:
    name: str
    display_name: str
    config_class: type
    model_class: type
    head_class: type
    vision_tower: tuple[str, ...]  # where the head keeps the vision tower
    projector: tuple[str, ...]  # and what compresses the tower's patches into the decoder's tokens
    native_config_class: type | None = None  # the native checkpoint grafting starts from; None for LLaVA-VR
    native_head_class: type | None = None
    parts: dict[str, tuple[str, ...]] = field(init=False)

    def __post_init__(self):
        parts = {"vision_tower": self.vision_tower, "projector": self.projector, **SHARED_PARTS}
        object.__setattr__(self, "parts", parts)

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    @property
    def grafted(self) -> bool:
        return self.native_config_class is not None

    @property
    def native_model_type(self) -> str | None:
        return self.native_config_class.model_type if self.grafted else None


BACKBONES = {
    backbone.name: backbone
    for backbone in (
        Backbone(
            "llava_vr",
            "LLaVA-VR",
            VisionRememberConfig,
            VisionRememberModel,
            VisionRememberForConditionalGeneration,
            vision_tower=("model.vision_tower",),
            # the AnyRes row separator trains with the projector, as in LLaVA-NeXT
            projector=("model.multi_modal_projector", "model.image_newline"),
        ),
        Backbone(
            "qwen2_5_vl",
            "Qwen2.5-VL",
            VisionRememberQwen2_5_VLConfig,
            VisionRememberQwen2_5_VLModel,
            VisionRememberQwen2_5_VLForConditionalGeneration,
            vision_tower=("model.visual",),
            projector=("model.visual.merger",),  # the 2x2 patch merger into the decoder's width
            native_config_class=Qwen2_5_VLConfig,
            native_head_class=Qwen2_5_VLForConditionalGeneration,
        ),
        Backbone(
            "qwen3_vl",
            "Qwen3-VL",
            VisionRememberQwen3VLConfig,
            VisionRememberQwen3VLModel,
            VisionRememberQwen3VLForConditionalGeneration,
            vision_tower=("model.visual",),
            # the 2x2 patch merger, and DeepStack's, which merge earlier encoder layers into the decoder's width
            projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
            native_config_class=Qwen3VLConfig,
            native_head_class=Qwen3VLForConditionalGeneration,
        ),
        Backbone(
            "minicpmv4_6",
            "MiniCPM-V 4.6",
            VisionRememberMiniCPMV4_6Config,
            VisionRememberMiniCPMV4_6Model,
            VisionRememberMiniCPMV4_6ForConditionalGeneration,
            vision_tower=("model.vision_tower",),
            # both 2x2 mergers: window attention inside the ViT after `insert_layer_id`, and the MLP into the decoder
            projector=("model.vision_tower.vit_merger", "model.merger"),
            native_config_class=MiniCPMV4_6Config,
            native_head_class=MiniCPMV4_6ForConditionalGeneration,
        ),
    )
}
GRAFTS = tuple(name for name, backbone in BACKBONES.items() if backbone.grafted)


def backbone_for(model_type: str) -> Backbone:
    """The record of a vr-hf checkpoint's `model_type`; a clear error for any other."""
    for backbone in BACKBONES.values():
        if backbone.model_type == model_type:
            return backbone
    known = ", ".join(backbone.model_type for backbone in BACKBONES.values())
    raise ValueError(f"model type {model_type!r} is not a vr-hf checkpoint's: vr-hf knows {known}.")


def register_auto_classes():
    """Register every kind of checkpoint with the Auto classes, in this process and for the Hub (`save_pretrained`
    then writes the `auto_map` and copies the remote-code files). Importing this module does it."""
    for backbone in BACKBONES.values():
        AutoConfig.register(backbone.model_type, backbone.config_class, exist_ok=True)
        AutoModel.register(backbone.config_class, backbone.model_class, exist_ok=True)
        AutoModelForImageTextToText.register(backbone.config_class, backbone.head_class, exist_ok=True)
        backbone.config_class.register_for_auto_class("AutoConfig")
        backbone.model_class.register_for_auto_class("AutoModel")
        backbone.head_class.register_for_auto_class("AutoModelForImageTextToText")
    AutoProcessor.register(VisionRememberConfig, VisionRememberProcessor, exist_ok=True)
    VisionRememberProcessor.register_for_auto_class("AutoProcessor")


register_auto_classes()

__all__ = ["BACKBONES", "Backbone", "GRAFTS", "backbone_for"]
