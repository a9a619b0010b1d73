"""Training phases: which parts of a Vision Remember model train, each at its own learning rate.

Every model `vr_hf` builds has the same five parts, wherever its architecture keeps them (`vr_hf.backbones`):
`vision_tower`, `projector`, `vision_remember`, `language_model` (decoder layers, embeddings, final norm) and
`lm_head`.

The projector is whatever compresses the vision tower's patches into the decoder's tokens: the detail Vision
Remember gives back is the detail it loses.

The paper's recipe, as LLaVA's, for every backbone: phase 1 (alignment) trains the projector and the Vision Remember
blocks on captions, phase 2 (instruction tuning) adds the language model and its head; the vision tower stays frozen.

A parameter shared by several parts (tied embeddings: `lm_head.weight` is `embed_tokens.weight`) trains when any part
that holds it trains, in the group of the first such part in `PARTS` order.

    trainer = SFTTrainer(model=model, ..., optimizer_cls_and_kwargs=parts_optimizer(PHASE_1))

`parts_optimizer` builds AdamW over `trainable_parameter_groups` when the Trainer builds its own optimizer, on the
model it is about to train. A ready-made optimizer (`optimizers=(optimizer, None)`) works on one device and under DDP
too, but the Trainer refuses it under FSDP.

The recipes in `examples/` (`train_alignment.py`, `train_instruction.py`) put this together with data loading
(`vr_hf.recipes`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .backbones import backbone_for


PARTS = ("vision_tower", "projector", "vision_remember", "language_model", "lm_head")

# The paper's learning rates: 1e-3 for alignment (global batch 256), 2e-4 for instruction tuning (global batch 32).
PHASE_1 = {"projector": 1e-3, "vision_remember": 1e-3}
PHASE_2 = {"projector": 2e-4, "vision_remember": 2e-4, "language_model": 2e-4, "lm_head": 2e-4}
PHASES = {1: PHASE_1, 2: PHASE_2, "alignment": PHASE_1, "instruction": PHASE_2}


def part_paths(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Where `model` keeps each part; a clear error for a model whose parts `vr_hf` does not know."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return backbone_for(model_type).parts
    except ValueError as error:
        raise ValueError(f"{type(model).__name__} has no known training parts: {error}") from None


def parameters_by_part(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each part's parameters, in module order; a part the model lacks has none."""
    prefix = "model." if getattr(model, "base_model", None) is model else ""  # a bare base model
    owners = sorted(
        ((path, part) for part, paths in part_paths(model).items() for path in paths), key=lambda item: -len(item[0])
    )
    parameters = {part: {} for part in PARTS}
    for name, parameter in model.named_parameters(remove_duplicate=False):  # tied weights under each of their names
        name = prefix + name
        part = next((part for path, part in owners if name == path or name.startswith(path + ".")), None)
        if part is not None:
            parameters[part].setdefault(id(parameter), parameter)
    return {part: list(found.values()) for part, found in parameters.items()}


def part_parameters(model: nn.Module, part: str) -> list[nn.Parameter]:
    """The parameters of one part, in module order; a clear error for an unknown or absent part."""
    if part not in PARTS:
        raise ValueError(f"Unknown part {part!r}: choose from {', '.join(PARTS)}.")
    parameters = parameters_by_part(model)[part]
    if not parameters:
        raise ValueError(
            f"The model has no {part!r} part (looked for {', '.join(part_paths(model)[part])})"
            + (": it was built with use_vision_remember=False." if part == "vision_remember" else ".")
        )
    return parameters


def trainable_parameter_groups(
    model: nn.Module, learning_rates: Mapping[str, float] | int | str, weight_decay: float | None = None
) -> list[dict]:
    """Freeze all of `model`, then unfreeze the parts in `learning_rates` and return their optimizer groups.

    Args:
        model: A model `vr_hf` builds (LLaVA-VR or a graft), or its bare base model.
        learning_rates: `{part: learning rate}` over `PARTS`, or a phase (`1`/`"alignment"`, `2`/`"instruction"`).
        weight_decay: Set on every group when given.

    Returns:
        One group per part, `{"name": part, "params": [...], "lr": lr}`, for any `torch.optim` optimizer. A parameter
        shared by two parts appears once.
    """
    if not isinstance(learning_rates, Mapping):
        if learning_rates not in PHASES:
            raise ValueError(f"Unknown phase {learning_rates!r}: choose from {', '.join(map(str, PHASES))}.")
        learning_rates = PHASES[learning_rates]
    unknown = [part for part in learning_rates if part not in PARTS]
    if unknown:
        raise ValueError(f"Unknown part(s) {', '.join(map(repr, unknown))}: choose from {', '.join(PARTS)}.")
    if not learning_rates:
        raise ValueError("No part to train: name at least one of " + ", ".join(PARTS) + ".")

    model.requires_grad_(False)
    seen: set[int] = set()
    groups = []
    for part in sorted(learning_rates, key=PARTS.index):
        params = [p for p in part_parameters(model, part) if id(p) not in seen]
        seen.update(id(p) for p in params)
        for parameter in params:
            parameter.requires_grad_(True)
        if not params:  # everything already claimed by an earlier part (a fully tied part)
            continue
        group = {"name": part, "params": params, "lr": float(learning_rates[part])}
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def trainable_parts(model: nn.Module) -> dict[str, bool]:
    """For each part the model has: whether any of its parameters trains."""
    return {
        part: any(p.requires_grad for p in parameters)
        for part, parameters in parameters_by_part(model).items()
        if parameters
    }


class PartsOptimizer:
    """An optimizer factory for the Trainer: `Trainer(..., optimizer_cls_and_kwargs=parts_optimizer(PHASE_1))`.

    The Trainer calls `PartsOptimizer()(model, **kwargs)` where it would build its default optimizer.
    """

    def __call__(self, model: nn.Module, learning_rates, weight_decay: float = 0.0, **adamw_kwargs):
        groups = trainable_parameter_groups(model, learning_rates, weight_decay=weight_decay)
        return torch.optim.AdamW(groups, **adamw_kwargs)


def parts_optimizer(learning_rates: Mapping[str, float] | int | str, weight_decay: float = 0.0, **adamw_kwargs):
    """`(factory, kwargs)` for the Trainer's `optimizer_cls_and_kwargs`: AdamW with one group per trained part.

    Args:
        learning_rates: `{part: learning rate}` or a phase, as for `trainable_parameter_groups`.
        weight_decay: Weight decay of every group (LLaVA trains without any).
        adamw_kwargs: Passed to `torch.optim.AdamW` (e.g. `betas`).
    """
    return PartsOptimizer, {"learning_rates": learning_rates, "weight_decay": weight_decay, **adamw_kwargs}


__all__ = [
    "PARTS",
    "PHASE_1",
    "PHASE_2",
    "PHASES",
    "PartsOptimizer",
    "part_parameters",
    "part_paths",
    "parameters_by_part",
    "parts_optimizer",
    "trainable_parameter_groups",
    "trainable_parts",
]
