"""Graft Vision Remember onto native Transformers VLM checkpoints, and strip it off again.

`graft` turns a native checkpoint of any grafted backbone of `vr_hf.backbones` (Transformers' own Qwen2.5-VL,
Qwen3-VL, MiniCPM-V 4.6) into a remote-code checkpoint of the same model with Vision Remember: every native weight
keeps its key and value, the new blocks live under `model.vision_remember.*`, and with `identity_init` (the
default) the grafted model's logits equal the original's exactly until it is trained. `strip_vision_remember` gives
back the native architecture, config and keys.

The source's tokenizer, processor and chat-template files are carried over unchanged. Everything is checked and built
in memory before anything is written; the output is written into a temporary sibling folder that is renamed at the
end, so a failed conversion leaves no output folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoTokenizer, PreTrainedConfig

from ..backbones import BACKBONES, GRAFTS, Backbone, backbone_for
from ..checkpoints import ConversionError, check_output_dir, load_part, resolve_source, write_checkpoint
from ..processor import generation_prompt_ids


PREFIX = "model.vision_remember."
# What a config's own bookkeeping adds; neither the native nor the grafted config takes it as an argument.
CONFIG_BOOKKEEPING = ("model_type", "architectures", "auto_map", "transformers_version")
# Files a checkpoint's model writes itself, or that belong to one architecture only: never carried over.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".safetensors.index.json", ".bin.index.json")
MODEL_FILES = ("config.json", "generation_config.json", "README.md")


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
    return load_part(snapshot_download, source, "checkpoint files", ignore_patterns=patterns)


def _model_type(source: str) -> str:
    config, _ = load_part(PreTrainedConfig.get_config_dict, source, "config")
    return config.get("model_type")


def _config_arguments(config: PreTrainedConfig, drop=()) -> dict:
    arguments = config.to_dict()
    for name in (*CONFIG_BOOKKEEPING, *drop):
        arguments.pop(name, None)
    return arguments


def _graft_config(backbone: Backbone, source: str, settings: dict):
    unknown = sorted(set(settings) - set(backbone.config_class.graft_fields()))
    if unknown:
        raise ConversionError(
            f"Unknown Vision Remember settings {unknown}: use {backbone.config_class.graft_fields()}."
        )
    native = load_part(backbone.native_config_class.from_pretrained, source, f"{backbone.display_name} config")
    if "generation_prompt_ids" not in settings:
        settings = dict(settings, generation_prompt_ids=_generation_prompt_ids(source))
    try:
        return backbone.config_class(**_config_arguments(native), **settings)
    except (StrictDataclassError, TypeError) as error:  # the config's own checks: each names the field and the fix
        raise ConversionError(f"Invalid Vision Remember settings for this checkpoint: {error}") from error


def _generation_prompt_ids(source: str) -> list[int] | None:
    """The source tokenizer's chat-template generation prompt, or None where it has no tokenizer or template."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None
    return generation_prompt_ids(tokenizer)


def _write_converted(model, original, source: str, output_dir: str, card):
    """Write `model` with `original`'s weights, dtype and generation config, beside `source`'s other files and the
    model card `card(model, source)`."""
    _copy_weights(model, original.state_dict())
    model.to(original.dtype)
    model.generation_config = original.generation_config
    write_checkpoint(output_dir, model, CarriedFiles(_local_folder(source)), {"README.md": card(model, source)})


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
    name = BACKBONES[config.backbone_model_type].display_name
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


def graft(source: str, output_dir: str, *, overwrite: bool = False, seed: int = 0, **settings) -> str:
    """Graft Vision Remember onto a native checkpoint of any backbone in `vr_hf.backbones` (Qwen2.5-VL, Qwen3-VL,
    MiniCPM-V 4.6; told by its `model_type`); return the output folder.

    Args:
        source: Hub id or folder of the native checkpoint.
        output_dir: Folder to write; it must not exist or be empty unless `overwrite=True`.
        overwrite: Replace a non-empty `output_dir` (only once the new checkpoint is fully written).
        seed: Seed of the new blocks' initialisation.
        **settings: The grafted config's own fields: `remember_after_layers`, `vision_feature_layers`,
            `interaction`, `multi_level`, `bidirectional`, `text_guidance`, `cross_attention_heads`, `identity_init`,
            and a backbone's own (Qwen3-VL's `deepstack`). `vision_feature_layers` must be full-resolution hidden
            states (MiniCPM-V: `0..insert_layer_id + 1`).
    """
    output_dir = check_output_dir(output_dir, overwrite)
    source = resolve_source(source, "source")
    found = _model_type(source)
    grafted = {BACKBONES[name].model_type for name in GRAFTS}
    if found in grafted:
        raise ConversionError(
            f"{source!r} already has Vision Remember (model_type {found!r}): strip it first with "
            "strip_vision_remember, or train it as it is."
        )
    natives = {BACKBONES[name].native_model_type: BACKBONES[name] for name in GRAFTS}
    if found not in natives:
        raise ConversionError(
            f"{source!r} is a {found!r} checkpoint: Vision Remember grafts onto "
            f"{', '.join(backbone.display_name for backbone in natives.values())} (model_type one of {list(natives)})."
        )
    backbone = natives[found]
    config = _graft_config(backbone, source, settings)
    native = load_part(
        backbone.native_head_class.from_pretrained, source, f"{backbone.display_name} model", dtype="auto"
    )

    torch.manual_seed(seed)
    model = backbone.head_class(config).eval()
    _write_converted(model, native, source, output_dir, _graft_card)
    return output_dir


def strip_vision_remember(source: str, output_dir: str, *, overwrite: bool = False) -> str:
    """Remove Vision Remember from a grafted checkpoint: the native class, config and keys; return the output folder.

    The native weights are written as they are in `source` (trained or not); the `model.vision_remember.*` weights are
    dropped.
    """
    output_dir = check_output_dir(output_dir, overwrite)
    source = resolve_source(source, "source")
    found = _model_type(source)
    grafted_types = [BACKBONES[name].model_type for name in GRAFTS]
    if found not in grafted_types:
        raise ConversionError(
            f"{source!r} (model_type {found!r}) has no Vision Remember to strip: give a checkpoint written by graft "
            f"(model_type one of {grafted_types})."
        )
    backbone = backbone_for(found)
    grafted = load_part(backbone.head_class.from_pretrained, source, "grafted model", dtype="auto")
    drop = backbone.config_class.graft_fields()
    config = backbone.native_config_class(**_config_arguments(grafted.config, drop))
    model = backbone.native_head_class(config).eval()
    _write_converted(model, grafted, source, output_dir, _strip_card)
    return output_dir


__all__ = ["graft", "strip_vision_remember"]
