"""Build a LLaVA-VR checkpoint (`VisionRememberForConditionalGeneration`) from a pretrained vision tower and a
pretrained decoder.

The pretrained weights are copied in untouched (the decoder's embedding matrix only grows by the rows of tokens the
tokenizer lacked); the projector, the image newline and the Vision Remember blocks are freshly initialised. With
`identity_init` (the default) the result reproduces the decoder's text-only logits exactly.

Everything is loaded, checked and built in memory before anything is written; the checkpoint is written into a
temporary sibling folder that is renamed to `output_dir` at the end, so a failed conversion leaves no output folder.
"""

from __future__ import annotations

import json
import os

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..checkpoints import ConversionError, check_output_dir, load_part, resolve_source, write_checkpoint
from ..modeling import VisionRememberConfig, VisionRememberForConditionalGeneration
from ..modeling.processing_llava_vr import CHAT_TEMPLATE
from ..processor import build_processor, generation_prompt_ids


IMAGE_TOKEN = "<|image_pad|>"
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", IMAGE_TOKEN]
# The processor's ChatML chat template uses these: without them `<|im_end|>` would be spelled out in many pieces.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
VISION_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "image_size", "patch_size")
TEXT_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def _vision_config(source_config):
    """The vision part of a checkpoint's config: `SiglipModel`/`CLIPModel` configs hold it as `vision_config`."""
    config = getattr(source_config, "vision_config", None) or source_config
    missing = [field for field in VISION_CONFIG_FIELDS if getattr(config, field, None) is None]
    if missing:
        raise ConversionError(
            f"The vision checkpoint's config ({type(source_config).__name__}, model_type "
            f"{source_config.model_type!r}) lacks {missing}: give a ViT-style vision model with hidden states "
            "(SigLIP, CLIP, ...)."
        )
    return config


def _text_config(config):
    if getattr(config, "is_encoder_decoder", False):
        raise ConversionError(
            f"The text model (model_type {config.model_type!r}) is an encoder-decoder: give a decoder-only causal LM "
            "(Qwen2, Llama, ...)."
        )
    if hasattr(config, "text_config") and getattr(config, "vocab_size", None) is None:
        raise ConversionError(
            f"The text model (model_type {config.model_type!r}) is a composite model: give a decoder-only causal LM "
            "checkpoint (Qwen2, Llama, ...)."
        )
    missing = [field for field in TEXT_CONFIG_FIELDS if getattr(config, field, None) is None]
    if missing:
        raise ConversionError(
            f"The text model's config (model_type {config.model_type!r}) lacks {missing}: give a decoder-only causal "
            "LM (Qwen2, Llama, ...)."
        )
    return config


def _add_special_tokens(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    missing = [token for token in CHAT_TOKENS + VISION_TOKENS if token not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    return missing


def _image_statistics(source: str) -> dict:
    """Mean and std of the vision checkpoint's own image processor; SigLIP's 0.5 where it has none."""
    try:
        image_processor = AutoImageProcessor.from_pretrained(source)
        return {"image_mean": list(image_processor.image_mean), "image_std": list(image_processor.image_std)}
    except Exception:  # noqa: BLE001 - no preprocessor_config.json, or one we cannot use: fall back
        return {}


def _vision_state(vision: torch.nn.Module, tower: torch.nn.Module) -> dict:
    """The vision weights under the tower's key names: a vision-only checkpoint's own, or a full `SiglipModel`'s or
    `CLIPModel`'s vision part (with or without its `vision_model.` prefix)."""
    needed = set(tower.state_dict())
    candidates = [vision.state_dict()]
    for attribute in ("vision_model", "vision_tower", "visual"):
        part = getattr(vision, attribute, None)
        if isinstance(part, torch.nn.Module):
            state = part.state_dict()
            candidates += [state, {f"{attribute}.{name}": tensor for name, tensor in state.items()}]
    return max(candidates, key=lambda state: len(needed & set(state)))


def _copy(target: torch.nn.Module, state: dict, role: str, source: str):
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConversionError(
            f"The {role} checkpoint {source!r} lacks {len(missing)} weights the model needs, e.g. {missing[:5]}: "
            "is it the right kind of model?"
        )
    for name, tensor in expected.items():
        if state[name].shape != tensor.shape:
            raise ConversionError(
                f"{role} weight {name!r} has shape {tuple(state[name].shape)} in {source!r} but the model needs "
                f"{tuple(tensor.shape)}."
            )
    target.load_state_dict({name: state[name] for name in expected}, strict=True)


def _model_card(model, vision_model: str, text_model: str, added_tokens: list[str], old_vocab: int) -> str:
    config = model.config
    vision, text = config.vision_config, config.text_config
    grid, tokens = config.grid_size, config.tokens_per_side
    remember = (
        f"after decoder layers {config.remember_after_layers} (0-based), attending to vision hidden states "
        f"{config.remember_feature_layers}, interaction `{config.interaction}`, bidirectional {config.bidirectional}, "
        f"text guidance {config.text_guidance}, identity init {config.identity_init}"
        if config.use_vision_remember
        else "off (`use_vision_remember=False`: the plain compressed baseline)"
    )
    anyres = config.image_grid_pinpoints or "off (one view per image)"
    vision_name = os.path.basename(os.path.normpath(vision_model))
    text_name = os.path.basename(os.path.normpath(text_model))
    vision_row = f"`{vision.model_type}`, {vision.num_hidden_layers} layers, width {vision.hidden_size}, {vision.image_size} px, patch {vision.patch_size}"  # noqa: E501
    text_row = f"`{text.model_type}`, {text.num_hidden_layers} layers, width {text.hidden_size}, vocabulary {old_vocab} -> {text.vocab_size}"  # noqa: E501
    projector_row = f"`{config.projector_type}`, {grid}x{grid} patches -> {tokens}x{tokens} tokens per view (ratio 1/{config.downsample_factor**2})"  # noqa: E501
    added = ", ".join(f"`{token}`" for token in added_tokens) or "none"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- vision-remember
- llava-vr
- custom_code
---

# LLaVA-VR built from `{vision_name}` and `{text_name}`

A `VisionRememberForConditionalGeneration` (LLaVA-VR) assembled from pretrained parts. **Only the vision tower and
the decoder are pretrained**: the projector, the image newline and the Vision Remember blocks are freshly
initialised, so this checkpoint needs multimodal training before it is useful.

| part | source | |
| --- | --- | --- |
| vision tower | `{vision_model}` | {vision_row} |
| decoder | `{text_model}` | {text_row} |
| projector | new | {projector_row} |
| Vision Remember | new | {remember} |

- AnyRes: {anyres}.
- Tokens added to the tokenizer (new embedding rows, freshly initialised): {added}. Image placeholder:
  `{IMAGE_TOKEN}` (id {config.image_token_id}).
- Chat template: ChatML with `{{% generation %}}` markers (assistant-only loss works in TRL).

## Load

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "path/to/this/checkpoint"  # or its Hub id
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
image = Image.open("photo.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe the image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt")
print(processor.batch_decode(model.generate(**inputs, max_new_tokens=32), skip_special_tokens=True))
```
"""


def build_from_parts(
    vision_model: str,
    text_model: str,
    output_dir: str,
    *,
    gguf_file: str | None = None,
    overwrite: bool = False,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    **config_overrides,
) -> str:
    """Build a LLaVA-VR checkpoint from a pretrained vision tower and a pretrained decoder; return its folder.

    Args:
        vision_model: Hub id or folder of a vision checkpoint: `SiglipVisionModel`, `CLIPVisionModel`, or a full
            `SiglipModel`/`CLIPModel` (its vision part is used).
        text_model: Hub id or folder of a decoder-only `*ForCausalLM` checkpoint with its tokenizer.
        output_dir: Folder to write; it must not exist or be empty unless `overwrite=True`.
        gguf_file: A GGUF file in `text_model` to read the decoder, its config and its tokenizer from (dequantized to
            float32 by Transformers; needs the `gguf` package), e.g. `"SmolLM2-135M-Instruct.Q4_1.gguf"`.
        overwrite: Replace a non-empty `output_dir` (only once the new checkpoint is fully written).
        dtype: Weight dtype of the written checkpoint (`"float32"`, `"bfloat16"`, `"float16"`, or a `torch.dtype`).
        seed: Seed of the new parts' initialisation.
        **config_overrides: `VisionRememberConfig` fields (`projector_type`, `downsample_factor`,
            `remember_after_layers`, `image_grid_pinpoints`, ...). `vision_feature_layers` defaults to the ends of the
            tower's thirds (`[7, 15, 23]` for 24 layers), `vision_feature_select_strategy` to `"default"` (drop the CLS
            token) for towers with a CLS token.
    """
    for field in ("vision_config", "text_config", "image_token_id"):
        if field in config_overrides:
            raise ConversionError(f"{field} comes from the parts and cannot be overridden.")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConversionError(f"dtype={dtype!r} is not a torch dtype: use 'float32', 'bfloat16' or 'float16'.")
        dtype = getattr(torch, dtype)

    # 1. Check every input before loading weights, and everything before writing.
    output_dir = check_output_dir(output_dir, overwrite)
    vision_source = resolve_source(vision_model, "vision_model")
    text_source = resolve_source(text_model, "text_model")
    text_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    vision_config = _vision_config(load_part(AutoConfig.from_pretrained, vision_source, "vision model config"))
    text_config = _text_config(load_part(AutoConfig.from_pretrained, text_source, "text model config", **text_kwargs))
    tokenizer = load_part(AutoTokenizer.from_pretrained, text_source, "tokenizer", **text_kwargs)
    added_tokens = _add_special_tokens(tokenizer)
    old_vocab = text_config.vocab_size
    vocab_size = max(old_vocab, len(tokenizer))

    grid = vision_config.image_size // vision_config.patch_size
    with torch.device("meta"):
        probe = AutoModel.from_config(vision_config)
    num_positions = getattr(getattr(probe, "vision_model", probe).embeddings, "num_positions", grid * grid)
    del probe
    settings = dict(
        vision_feature_select_strategy="default" if num_positions == grid * grid + 1 else "full",
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        generation_prompt_ids=generation_prompt_ids(tokenizer, CHAT_TEMPLATE),
    )
    settings.update(config_overrides)
    text_config_dict = dict(text_config.to_dict(), vocab_size=vocab_size)
    text_config_dict.pop("dtype", None)
    text_config_dict.pop("torch_dtype", None)
    vision_config_dict = vision_config.to_dict()
    vision_config_dict.pop("dtype", None)
    vision_config_dict.pop("torch_dtype", None)
    try:
        config = VisionRememberConfig(
            vision_config=vision_config_dict,
            text_config=text_config_dict,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            **settings,
        )
    except (StrictDataclassError, TypeError) as error:  # the config's own checks: each names the field and the fix
        raise ConversionError(f"Invalid Vision Remember settings for these parts: {error}") from error

    # 2. Load the parts and check them.
    vision = load_part(AutoModel.from_pretrained, vision_source, "vision model", dtype=torch.float32)
    decoder = load_part(
        AutoModelForCausalLM.from_pretrained, text_source, "text model", dtype=torch.float32, **text_kwargs
    )
    layers = getattr(decoder.base_model, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConversionError(
            f"The text model {text_model!r} ({type(decoder).__name__}) has no `.layers` on its base model: give a "
            "decoder-only model such as Qwen2 or Llama."
        )
    torch.manual_seed(seed)
    if vocab_size > decoder.get_input_embeddings().weight.shape[0]:
        decoder.resize_token_embeddings(vocab_size)

    # 3. Build the model: new parts initialised, pretrained parts copied in.
    model = VisionRememberForConditionalGeneration(config).eval()
    with torch.no_grad():
        _copy(model.model.vision_tower, _vision_state(vision, model.model.vision_tower), "vision", vision_model)
        _copy(model.model.language_model, decoder.base_model.state_dict(), "text", text_model)
        if not config.tie_word_embeddings:
            model.lm_head.load_state_dict(decoder.get_output_embeddings().state_dict())
    expected_head = decoder.get_output_embeddings().weight
    if not torch.equal(model.lm_head.weight, expected_head):
        raise ConversionError(
            "The converted LM head differs from the decoder's: its tying does not match tie_word_embeddings="
            f"{config.tie_word_embeddings}."
        )

    generation_config = decoder.generation_config
    eos = generation_config.eos_token_id
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    generation_config.eos_token_id = list(dict.fromkeys([config.eos_token_id, *eos]))
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.bos_token_id = getattr(tokenizer, "bos_token_id", None)
    model.generation_config = generation_config
    model.to(dtype)

    tokenizer.padding_side = "left"  # a batch's prompts end where generation starts
    processor = build_processor(config, tokenizer, **_image_statistics(vision_source))
    text_label = os.path.join(os.fspath(text_model), gguf_file) if gguf_file else text_model
    card = _model_card(model, vision_model, text_label, added_tokens, old_vocab)

    record = {
        "vision_model": os.fspath(vision_model),
        "text_model": os.fspath(text_model),
        "gguf_file": gguf_file,
        "added_tokens": added_tokens,
        "original_vocab_size": old_vocab,
        "config_overrides": config_overrides,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
    }

    # 4. Write into a temporary sibling folder, then rename it.
    write_checkpoint(
        output_dir, model, processor, {"README.md": card, "conversion.json": json.dumps(record, indent=2) + "\n"}
    )
    return output_dir


__all__ = ["ConversionError", "build_from_parts"]
