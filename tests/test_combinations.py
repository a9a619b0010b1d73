"""Every projector x ratio x interaction x ablation switch trains: finite loss and a gradient on every parameter.

3 windowed projectors x 3 ratios x 3 interactions x 2^3 switches (multi_level, bidirectional, text_guidance), plus the
Perceiver resampler (whose tokens attend to their whole image) x 3 ratios x 2^3 switches = 240 models, each small
enough to take a few tens of milliseconds.
"""

import itertools

import pytest
import torch

from vr_hf.modeling import VisionRememberForConditionalGeneration
from vr_hf.modeling.image_layout import ImageLayout
from vr_hf.tiny import tiny_config


PROJECTORS = ["avg_pool", "pixel_shuffle", "perceiver", "ldpv2"]
RATIOS = [2, 3, 4]
INTERACTIONS = ["local", "deformable", "global"]
SWITCHES = ["multi_level", "bidirectional", "text_guidance"]

CASES = [
    dict(projector_type=projector, downsample_factor=ratio, interaction=interaction, **dict(zip(SWITCHES, switches)))
    for projector, ratio, interaction, switches in itertools.product(
        PROJECTORS, RATIOS, INTERACTIONS, itertools.product([False, True], repeat=len(SWITCHES))
    )
    if projector != "perceiver" or interaction == "global"  # its tokens have no window of their own
]


def case_id(case: dict) -> str:
    flags = "".join(name[0].upper() if case[name] else name[0] for name in SWITCHES)
    return f"{case['projector_type']}-s{case['downsample_factor']}-{case['interaction']}-{flags}"


def micro_model(**axes) -> VisionRememberForConditionalGeneration:
    """Smaller than `tiny_config`: 2 vision layers of width 16, 3 decoder layers of width 32. Vision Remember runs
    after decoder layers 0 and 1 (after the last one it could reach no supervised position) with non-zero output
    projections (`identity_init=False`), so one backward reaches every one of its parameters."""
    tiny = tiny_config()
    config = tiny_config(
        vision_config=dict(
            tiny.vision_config.to_dict(),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=dict(
            tiny.text_config.to_dict(), hidden_size=32, intermediate_size=64, num_hidden_layers=3, layer_types=None
        ),
        vision_feature_layers=[1, 2],
        remember_after_layers=[0, 1],
        identity_init=False,
        **axes,
    )
    torch.manual_seed(0)
    return VisionRememberForConditionalGeneration(config).train()


def training_batch(config) -> dict:
    """Left-padded: a text-only sample, then a wide and a tall image (AnyRes tiles, unpadded rows and columns).
    Labels supervise only the answers: -100 on padding, prompt text and image tokens."""
    layout = ImageLayout.from_config(config)
    image_sizes = [(20, 72), (72, 20)]
    prompts = [[10, 11, 12, 13], [20] + [config.image_token_id] * layout.num_tokens(image_sizes[0]) + [21, 22]]
    prompts.append([30, 31] + [config.image_token_id] * layout.num_tokens(image_sizes[1]) + [32])
    answers = [[40, 41, 42], [50, 51], [60, 61, 62, 63]]

    length = max(len(prompt) + len(answer) for prompt, answer in zip(prompts, answers))
    input_ids, labels, attention_mask = [], [], []
    for prompt, answer in zip(prompts, answers):
        padding = length - len(prompt) - len(answer)
        input_ids.append([config.pad_token_id] * padding + prompt + answer)
        labels.append([-100] * (padding + len(prompt)) + answer)
        attention_mask.append([0] * padding + [1] * (len(prompt) + len(answer)))

    view_size = config.vision_config.image_size
    max_views = max(layout.num_views(size) for size in image_sizes)
    generator = torch.Generator().manual_seed(0)
    return dict(
        input_ids=torch.tensor(input_ids),
        labels=torch.tensor(labels),
        attention_mask=torch.tensor(attention_mask),
        pixel_values=torch.randn(len(image_sizes), max_views, 3, view_size, view_size, generator=generator),
        image_sizes=torch.tensor(image_sizes),
    )


def parameters_that_need_gradients(model) -> dict:
    """Every parameter but the vision tower's post-layernorm: the model reads the tower's hidden states, which come
    before it."""
    return {
        name: parameter
        for name, parameter in model.named_parameters()
        if not name.startswith("model.vision_tower.post_layernorm.")
    }


def check_switches_took_effect(model, case: dict):
    config, remember = model.config, model.model.vision_remember
    assert len(remember.feature_norms) == (len(config.vision_feature_layers) if case["multi_level"] else 1)
    assert remember.text_guidance == (case["text_guidance"] and case["bidirectional"])
    for layer in remember.layers.values():
        assert (layer.self_attention is not None) == case["bidirectional"]
        assert hasattr(layer.cross_attention, "sampling_offsets") == (case["interaction"] == "deformable")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_backward(case):
    model = micro_model(**case)
    check_switches_took_effect(model, case)

    output = model(**training_batch(model.config))
    assert torch.isfinite(output.loss)
    output.loss.backward()

    parameters = parameters_that_need_gradients(model)
    missing = [name for name, parameter in parameters.items() if parameter.grad is None]
    assert not missing, f"no gradient reached {missing}"
    broken = [name for name, parameter in parameters.items() if not torch.isfinite(parameter.grad).all()]
    assert not broken, f"non-finite gradient in {broken}"
    silent = [name for name, parameter in parameters.items() if not parameter.grad.abs().sum() > 0]
    assert not silent, f"zero gradient in {silent}"
