"""LoRA and QLoRA on the decoder with PEFT; projector and Vision Remember fully trained; merging back to a checkpoint.

    peft_config = lora_config(model, rank=16)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                         peft_config=peft_config)
    trainer.train()
    save_merged(trainer.model, processor, "llava-vr-merged")  # a remote-code checkpoint, no PEFT needed to load it

Adapters go on the decoder's attention and MLP projections only: a plain list such as `["q_proj", "v_proj"]` would also
hit the vision tower's and the Vision Remember blocks' projections. The projector and the Vision Remember blocks are
new to the decoder, so they train in full (PEFT's `modules_to_save`), wherever the model's backbone keeps them
(`vr_hf.backbones`: LLaVA-VR's `multi_modal_projector`, Qwen2.5-VL's `visual.merger`, Qwen3-VL's merger and DeepStack
mergers, MiniCPM-V's two mergers). A part that is a bare parameter, not a module (LLaVA-VR's AnyRes `image_newline`),
cannot be held by `modules_to_save`: it stays as phase 1 left it, and `lora_summary` says so.
"""

from __future__ import annotations

import importlib.util
from operator import attrgetter

import torch
from peft import LoraConfig, PeftModel
from transformers import BitsAndBytesConfig

from .backbones import BACKBONES
from .training import part_paths


DECODER_PROJECTIONS = r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
FULLY_TRAINED_PARTS = ("projector", "vision_remember")
# Kept in full precision under QLoRA: everything but the decoder (the frozen vision tower, the fully trained parts and
# the head), for every model type. Transformers matches these from the start of a module's full name (or as a suffix
# of it): "vision_tower" alone would not match "model.vision_tower.encoder.layers.0.self_attn.q_proj".
NOT_QUANTIZED_MODULES = sorted(
    {
        path
        for parts in (backbone.parts for backbone in BACKBONES.values())
        for part, paths in parts.items()
        if part != "language_model"
        for path in paths
    }
)


def fully_trained_paths(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Where `model` keeps the parts LoRA trains in full: the paths that are modules (PEFT's `modules_to_save`), and
    those that are bare parameters, which stay as they are."""
    found = {path: attrgetter(path)(model) for part in FULLY_TRAINED_PARTS for path in part_paths(model)[part]}
    modules = []
    for path, value in found.items():
        if isinstance(value, (torch.nn.ModuleList, torch.nn.ModuleDict)):  # PEFT copies modules, not containers
            modules += [f"{path}.{name}" for name in value._modules]
        elif isinstance(value, torch.nn.Module):
            modules.append(path)
    return modules, [path for path, value in found.items() if isinstance(value, torch.nn.Parameter)]


def lora_config(
    model: torch.nn.Module, rank: int = 16, alpha: int | None = None, dropout: float = 0.05, **kwargs
) -> LoraConfig:
    """A `LoraConfig` for `model`: adapters on every decoder projection, its projector and Vision Remember in full.

    Args:
        model: The model to adapt (LLaVA-VR or a graft): where it keeps its projector.
        rank: The LoRA rank `r`.
        alpha: The LoRA scaling numerator; defaults to `2 * rank`.
        dropout: Dropout on the adapters' input.
        kwargs: Any other `LoraConfig` field (e.g. `use_rslora=True`).
    """
    modules, _ = fully_trained_paths(model)
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=DECODER_PROJECTIONS,
        modules_to_save=modules,
        task_type="CAUSAL_LM",
        **kwargs,
    )


def lora_summary(model: torch.nn.Module, config: LoraConfig) -> str:
    """What trains under `config`, as the log and the model card say it."""
    modules, parameters = fully_trained_paths(model)
    summary = f"rank {config.r} adapters on the decoder's projections; {', '.join(modules)} in full"
    if parameters:
        summary += f"; {', '.join(parameters)} frozen (a bare parameter, which PEFT cannot train in full)"
    return summary + "; everything else frozen"


def qlora_quantization_config(compute_dtype: torch.dtype = torch.bfloat16) -> BitsAndBytesConfig:
    """The 4-bit NF4 config for QLoRA: pass it to `from_pretrained(..., quantization_config=...)`.

    Only the decoder's linear layers are quantized (`NOT_QUANTIZED_MODULES` stay as they are). bitsandbytes runs NF4 on
    CUDA GPUs and on CPUs.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install 'vr-hf[train]' (or pip install bitsandbytes).")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(NOT_QUANTIZED_MODULES),
    )


def merge_lora(model: PeftModel):
    """Fold the adapters into the decoder's weights and unwrap the fully trained modules.

    Returns the plain `VisionRememberForConditionalGeneration`, with the same outputs as the adapted model.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"Expected a peft.PeftModel (e.g. SFTTrainer's `trainer.model`), got {type(model).__name__}.")
    return model.merge_and_unload()


def save_merged(model: PeftModel, processor, output_dir) -> None:
    """Merge the adapters and save model and processor as a remote-code checkpoint that loads without PEFT.

    The merged model replaces the adapted one: `model` must not be used afterwards.
    """
    merged = merge_lora(model)
    merged.save_pretrained(output_dir)
    if processor is not None:
        processor.save_pretrained(output_dir)
    return merged


def merge_adapter_checkpoint(base_model_path, adapter_path, output_dir, dtype: torch.dtype | None = None) -> None:
    """Merge a saved adapter (from a LoRA or QLoRA run) into its unquantized base checkpoint and save the result.

    QLoRA adapters are merged this way, into the full-precision weights rather than the 4-bit ones they trained on.
    """
    from .recipes import load_model_and_processor

    base, processor = load_model_and_processor(base_model_path, dtype=dtype)
    save_merged(PeftModel.from_pretrained(base, adapter_path), processor, output_dir)


__all__ = [
    "DECODER_PROJECTIONS",
    "FULLY_TRAINED_PARTS",
    "fully_trained_paths",
    "NOT_QUANTIZED_MODULES",
    "lora_config",
    "lora_summary",
    "merge_adapter_checkpoint",
    "merge_lora",
    "qlora_quantization_config",
    "save_merged",
]
