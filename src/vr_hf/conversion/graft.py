"""Graft Vision Remember onto native Transformers VLM checkpoints, and strip it off again.

`graft_qwen2_5_vl` and `graft_minicpmv4_6` turn a `Qwen2_5_VLForConditionalGeneration` or
`MiniCPMV4_6ForConditionalGeneration` checkpoint into a remote-code checkpoint of the same model with Vision Remember:
every native weight keeps its key and value, the new blocks live under `model.vision_remember.*`, and with
`identity_init` (the default) the grafted model's logits equal the original's exactly until it is trained.
`strip_vision_remember` gives back the native architecture, config and keys.

The source's tokenizer, processor and chat-template files are carried over unchanged. Everything is checked and built
in memory before anything is written; the output is written into a temporary sibling folder that is renamed at the
end, so a failed conversion leaves no output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer, PreTrainedConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

from ..modeling import (
    VisionRememberMiniCPMV4_6Config,
    VisionRememberMiniCPMV4_6ForConditionalGeneration,
    VisionRememberQwen2_5_VLConfig,
    VisionRememberQwen2_5_VLForConditionalGeneration,
)
from ..modeling.configuration_vision_remember_graft import VisionRememberGraftConfig
from ..processor import generation_prompt_ids
from .build import ConversionError, _check_output_dir, _load, _source, _write


PREFIX = "model.vision_remember."
# What a config's own bookkeeping adds; neither the native nor the grafted config takes it as an argument.
CONFIG_BOOKKEEPING = ("model_type", "architectures", "auto_map", "transformers_version")
# Files a checkpoint's model writes itself, or that belong to one architecture only: never carried over.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".safetensors.index.json", ".bin.index.json")
MODEL_FILES = ("config.json", "generation_config.json", "README.md")


@dataclass(frozen=True)
class Backbone:
    """A native VLM class and its Vision Remember counterpart."""

    name: str
    config_class: type
    model_class: type
    graft_config_class: type
    graft_model_class: type


BACKBONES = {
    "qwen2_5_vl": Backbone(
        "Qwen2.5-VL",
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        VisionRememberQwen2_5_VLConfig,
        VisionRememberQwen2_5_VLForConditionalGeneration,
    ),
    "minicpmv4_6": Backbone(
        "MiniCPM-V 4.6",
        MiniCPMV4_6Config,
        MiniCPMV4_6ForConditionalGeneration,
        VisionRememberMiniCPMV4_6Config,
        VisionRememberMiniCPMV4_6ForConditionalGeneration,
    ),
}
GRAFTED = {backbone.graft_config_class.model_type: model_type for model_type, backbone in BACKBONES.items()}


class CarriedFiles:
    """The source checkpoint's other files (tokenizer, processor, chat template), written beside the new weights; the
    tokenizer pads on the left, as generation needs (a batch's prompts then end where generation starts)."""

    def __init__(self, folder: str):
        self.folder = folder

    def save_pretrained(self, output_dir: str):
        for name in sorted(os.listdir(self.folder)):
            path, target = os.path.join(self.folder, name), os.path.join(output_dir, name)
            carried = os.path.isfile(path) and not name.startswith(".") and not name.endswith(MODEL_FILE_SUFFIXES)
            if carried and name not in MODEL_FILES and not os.path.exists(target):
                shutil.copy2(path, target)
        tokenizer_config = Path(output_dir, "tokenizer_config.json")
        if tokenizer_config.is_file():
            settings = json.loads(tokenizer_config.read_text())
            tokenizer_config.write_text(json.dumps({**settings, "padding_side": "left"}, indent=2) + "\n")


def _local_folder(source: str) -> str:
    """A local folder holding the checkpoint's non-weight files."""
    if os.path.isdir(source):
        return source
    patterns = [f"*{suffix}" for suffix in MODEL_FILE_SUFFIXES]
    return _load(snapshot_download, source, "checkpoint files", ignore_patterns=patterns)


def _model_type(source: str) -> str:
    config, _ = _load(PreTrainedConfig.get_config_dict, source, "config")
    return config.get("model_type")


def _config_arguments(config: PreTrainedConfig, drop=()) -> dict:
    arguments = config.to_dict()
    for name in (*CONFIG_BOOKKEEPING, *drop):
        arguments.pop(name, None)
    return arguments


def _graft_config(backbone: Backbone, source: str, settings: dict):
    unknown = sorted(set(settings) - set(VisionRememberGraftConfig.graft_fields()))
    if unknown:
        raise ConversionError(
            f"Unknown Vision Remember settings {unknown}: use {VisionRememberGraftConfig.graft_fields()}."
        )
    native = _load(backbone.config_class.from_pretrained, source, f"{backbone.name} config")
    if "generation_prompt_ids" not in settings:
        settings = dict(settings, generation_prompt_ids=_generation_prompt_ids(source))
    try:
        return backbone.graft_config_class(**_config_arguments(native), **settings)
    except (StrictDataclassError, TypeError) as error:  # the config's own checks: each names the field and the fix
        raise ConversionError(f"Invalid Vision Remember settings for this checkpoint: {error}") from error


def _generation_prompt_ids(source: str) -> list[int] | None:
    """The source tokenizer's chat-template generation prompt, or None where it has no tokenizer or template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None
    return generation_prompt_ids(tokenizer)


def _copy_weights(target: torch.nn.Module, state: dict):
    """Load `state` into `target`, refusing any key mismatch but the Vision Remember weights'."""
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(PREFIX)]
    unexpected = [key for key in unexpected if not key.startswith(PREFIX)]
    if missing or unexpected:
        raise ConversionError(
            f"The checkpoint's weights do not match {type(target).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}."
        )


def _graft_card(model, source: str) -> str:
    config = model.config
    name = BACKBONES[config.backbone_model_type].name
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- vision-remember
- {config.backbone_model_type}
- custom_code
---

# {name} with Vision Remember, grafted onto `{os.path.basename(os.path.normpath(source))}`

`{type(model).__name__}`: the native `{config.backbone_model_type}` model from `{source}` with Vision Remember
grafted on. Every original weight keeps its key and value; the new blocks (`{PREFIX}*`) are freshly initialised
{
        "with zero output projections, so the logits equal the original model's until it is trained"
        if config.identity_init
        else "(`identity_init=False`: the logits differ from the original's)"
    }.

- Vision Remember runs after decoder layers {config.remember_after_layers} (0-based), on prefill only.
- Each vision token attends to {
        "every patch of its image"
        if config.interaction == "global"
        else "the full-resolution patch block it was merged from"
    } (interaction `{config.interaction}`), with the vision encoder's
hidden states {config.remember_feature_layers} (0 = patch embeddings) as multi-level features.
- Bidirectional self-attention {config.bidirectional}, text guidance {config.text_guidance}.
- Tokenizer, processor and chat template: the original's, unchanged.

## Load

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "path/to/this/checkpoint"  # or its Hub id
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(path)
```

`vr_hf.conversion.strip_vision_remember(path, output_dir)` (`pip install vr-hf`) gives back the native checkpoint.
"""


def _strip_card(model, source: str) -> str:
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
---

# `{type(model).__name__}` with Vision Remember stripped off `{os.path.basename(os.path.normpath(source))}`

The native `{model.config.model_type}` checkpoint, from the Vision Remember checkpoint `{source}` without its
`{PREFIX}*` weights; every other weight keeps its key and value. Loads without remote code:

```python
from transformers import AutoModelForImageTextToText

path = "path/to/this/checkpoint"  # or its Hub id
model = AutoModelForImageTextToText.from_pretrained(path)
```
"""


def _graft(model_type: str, source: str, output_dir: str, overwrite: bool, seed: int, settings: dict) -> str:
    backbone = BACKBONES[model_type]
    output_dir = _check_output_dir(output_dir, overwrite)
    source = _source(source, "source")
    found = _model_type(source)
    if found in GRAFTED:
        raise ConversionError(
            f"{source!r} already has Vision Remember (model_type {found!r}): strip it first with "
            "strip_vision_remember, or train it as it is."
        )
    if found != model_type:
        raise ConversionError(
            f"{source!r} is a {found!r} checkpoint, not {model_type!r}: this conversion grafts onto {backbone.name}. "
            f"Supported: {sorted(BACKBONES)}."
        )
    config = _graft_config(backbone, source, settings)
    native = _load(backbone.model_class.from_pretrained, source, f"{backbone.name} model", dtype="auto")

    torch.manual_seed(seed)
    model = backbone.graft_model_class(config).eval()
    _copy_weights(model, native.state_dict())
    model.to(native.dtype)
    model.generation_config = native.generation_config
    _write(output_dir, model, CarriedFiles(_local_folder(source)), {"README.md": _graft_card(model, source)})
    return output_dir


def graft_qwen2_5_vl(source: str, output_dir: str, *, overwrite: bool = False, seed: int = 0, **settings) -> str:
    """Graft Vision Remember onto a `Qwen2_5_VLForConditionalGeneration` checkpoint; return the output folder.

    Args:
        source: Hub id or folder of a Qwen2.5-VL checkpoint.
        output_dir: Folder to write; it must not exist or be empty unless `overwrite=True`.
        overwrite: Replace a non-empty `output_dir` (only once the new checkpoint is fully written).
        seed: Seed of the new blocks' initialisation.
        **settings: `VisionRememberGraftConfig` fields: `remember_after_layers`, `vision_feature_layers`,
            `interaction`, `multi_level`, `bidirectional`, `text_guidance`, `cross_attention_heads`, `identity_init`...
    """
    return _graft("qwen2_5_vl", source, output_dir, overwrite, seed, settings)


def graft_minicpmv4_6(source: str, output_dir: str, *, overwrite: bool = False, seed: int = 0, **settings) -> str:
    """Graft Vision Remember onto a `MiniCPMV4_6ForConditionalGeneration` checkpoint; return the output folder.

    Arguments as for [`graft_qwen2_5_vl`]. `vision_feature_layers` must be full-resolution hidden states:
    `0..insert_layer_id + 1`.
    """
    return _graft("minicpmv4_6", source, output_dir, overwrite, seed, settings)


def strip_vision_remember(source: str, output_dir: str, *, overwrite: bool = False) -> str:
    """Remove Vision Remember from a grafted checkpoint: the native class, config and keys; return the output folder.

    The native weights are written as they are in `source` (trained or not); the `model.vision_remember.*` weights are
    dropped.
    """
    output_dir = _check_output_dir(output_dir, overwrite)
    source = _source(source, "source")
    found = _model_type(source)
    if found not in GRAFTED:
        raise ConversionError(
            f"{source!r} (model_type {found!r}) has no Vision Remember to strip: give a checkpoint written by "
            f"graft_qwen2_5_vl or graft_minicpmv4_6 (model_type one of {sorted(GRAFTED)})."
        )
    backbone = BACKBONES[GRAFTED[found]]
    grafted = _load(backbone.graft_model_class.from_pretrained, source, "grafted model", dtype="auto")
    drop = VisionRememberGraftConfig.graft_fields()
    config = backbone.config_class(**_config_arguments(grafted.config, drop))
    model = backbone.model_class(config).eval()
    _copy_weights(model, grafted.state_dict())
    model.to(grafted.dtype)
    model.generation_config = grafted.generation_config
    _write(output_dir, model, CarriedFiles(_local_folder(source)), {"README.md": _strip_card(model, source)})
    return output_dir


__all__ = ["graft_minicpmv4_6", "graft_qwen2_5_vl", "strip_vision_remember"]
