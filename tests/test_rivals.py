"""The rivals LLaVA-VR compares Vision Remember with, each against a reference written out by hand: DeepStack and
Cambrian-1's Spatial Vision Aggregator (`refusion`), TokenPacker's projector (`projector_type`), FastV's pruning
(`fastv_layer`). One view of 12 x 12 patches, 3 x 3 windows: 16 vision tokens, token `(i, j)` made from patches
`[3i:3i+3, 3j:3j+3]`."""

from contextlib import contextmanager

import pytest
import torch
from torch.nn import functional as F
from transformers import AutoModelForImageTextToText

from vr_hf.modeling import VisionRememberForConditionalGeneration, fastv
from vr_hf.modeling.vision_remember import OutputProjection
from vr_hf.tiny import tiny_config


GRID, SIDE, TOKENS = 12, 3, 16
RIVALS = {
    "deepstack": dict(refusion="deepstack", remember_after_layers=[0, 1, 2]),  # Qwen3-VL's one level per layer
    "sva": dict(refusion="sva"),
    "tokenpacker": dict(projector_type="tokenpacker", use_vision_remember=False),
    "fastv": dict(fastv_layer=2, fastv_keep_ratio=0.25, use_vision_remember=False),  # layers 2, 3 see 4 tokens
}


def rival_model(**settings) -> VisionRememberForConditionalGeneration:
    """One view per image; the blocks' output projections random, as trained ones are."""
    torch.manual_seed(0)
    model = VisionRememberForConditionalGeneration(tiny_config(image_grid_pinpoints=None, **settings)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutputProjection):
                module.weight.normal_(std=0.3)
    return model


def one_image(config) -> dict:
    torch.manual_seed(1)
    input_ids = torch.tensor([[7] + [config.image_token_id] * TOKENS + [8, 9]])
    return {"input_ids": input_ids, "pixel_values": torch.randn(1, 3, 36, 36)}


def tower_levels(model, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
    """Each requested vision hidden state of the one view, `(12, 12, Dv)`."""
    with torch.no_grad():
        states = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return [states[layer][0].view(GRID, GRID, -1) for layer in layers]


def window(grid: torch.Tensor, token: int) -> torch.Tensor:
    """Token `token`'s 3 x 3 patches, row by row: `(9, C)`."""
    i, j = divmod(token, GRID // SIDE)
    return grid[SIDE * i : SIDE * i + SIDE, SIDE * j : SIDE * j + SIDE].reshape(SIDE * SIDE, -1)


def layer_norm(states: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(states, states.shape[-1:], norm.weight, norm.bias, norm.eps)


def normalized_levels(model, pixel_values) -> list[torch.Tensor]:
    """The multi-level features as the blocks read them: each patch through its level's LayerNorm."""
    levels = tower_levels(model, pixel_values, model.config.vision_feature_layers)
    return [layer_norm(level, norm) for level, norm in zip(levels, model.model.vision_remember.feature_norms)]


def around_block(model, inputs, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of the vision tokens right before and right after the block after decoder layer `layer`."""
    seen = {}
    decoder = model.model.language_model.layers
    hooks = [
        decoder[layer].register_forward_hook(
            lambda module, args, output: seen.setdefault("before", output), prepend=True
        ),
        decoder[layer + 1].register_forward_pre_hook(lambda module, args: seen.setdefault("after", args[0])),
    ]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    return seen["before"][0, 1 : 1 + TOKENS], seen["after"][0, 1 : 1 + TOKENS]


def linear(states: torch.Tensor, layer) -> torch.Tensor:
    return states @ layer.weight.T + layer.bias


def test_deepstack_adds_each_levels_merged_windows_after_its_layer():
    model = rival_model(**RIVALS["deepstack"])
    inputs = one_image(model.config)
    levels = normalized_levels(model, inputs["pixel_values"])
    for position, layer in enumerate(model.config.remember_after_layers):
        merger = model.model.vision_remember.layers[str(layer)].mergers[0]
        before, after = around_block(model, inputs, layer)
        for token in range(TOKENS):
            stacked = window(levels[position], token).flatten()  # patch after patch, each patch's channels
            merged = linear(F.gelu(linear(layer_norm(stacked, merger.norm), merger.linear_fc1)), merger.linear_fc2)
            torch.testing.assert_close(after[token], before[token] + merged)


def test_deepstack_spreads_the_levels_over_fewer_blocks_in_equal_shares():
    model = rival_model(refusion="deepstack", remember_after_layers=[1], vision_feature_layers=[1, 2, 3])
    inputs = one_image(model.config)
    levels = normalized_levels(model, inputs["pixel_values"])
    mergers = model.model.vision_remember.layers["1"].mergers
    before, after = around_block(model, inputs, 1)
    for token in range(TOKENS):
        update = 0
        for level, merger in zip(levels, mergers):
            stacked = window(level, token).flatten()
            update = update + linear(
                F.gelu(linear(layer_norm(stacked, merger.norm), merger.linear_fc1)), merger.linear_fc2
            )
        torch.testing.assert_close(after[token], before[token] + update)


def test_sva_attends_from_each_token_to_its_window_of_every_level():
    model = rival_model(**RIVALS["sva"])
    inputs = one_image(model.config)
    levels = normalized_levels(model, inputs["pixel_values"])
    heads = model.config.self_attention_heads
    head_dim = model.config.text_config.hidden_size // heads
    for layer in model.config.remember_after_layers:
        block = model.model.vision_remember.layers[str(layer)]
        before, after = around_block(model, inputs, layer)
        normed = F.rms_norm(before, before.shape[-1:], block.norm.weight, block.norm.eps)
        queries = linear(normed, block.q_proj).view(TOKENS, heads, -1)
        for token in range(TOKENS):
            regions = [window(level, token) for level in levels]  # every level's 9 patches, one softmax
            keys = torch.cat([linear(region, k) for region, k in zip(regions, block.k_proj)]).view(-1, heads, head_dim)
            values = torch.cat([linear(region, v) for region, v in zip(regions, block.v_proj)]).view(
                -1, heads, head_dim
            )
            weights = torch.einsum("hd,khd->hk", queries[token], keys).div(head_dim**0.5).softmax(-1)
            output = torch.einsum("hk,khd->hd", weights, values).flatten()
            torch.testing.assert_close(after[token], before[token] + linear(output, block.out_proj))


def test_tokenpacker_points_query_their_regions_of_the_multi_level_features():
    model = rival_model(**RIVALS["tokenpacker"])
    config, packer = model.config, model.model.multi_modal_projector
    inputs = one_image(config)
    levels = tower_levels(model, inputs["pixel_values"], config.vision_feature_layers)
    features = torch.cat(levels, dim=-1)
    heads = config.vision_config.num_attention_heads
    head_dim = config.vision_config.hidden_size // heads
    expected = []
    for token in range(TOKENS):
        i, j = divmod(token, GRID // SIDE)
        point = levels[-1][SIDE * i + 1, SIDE * j + 1]  # bilinear downsampling by 3 reads each window's centre
        region = window(features, token)
        query = layer_norm(linear(point, packer.q_proj), packer.q_norm).view(heads, head_dim)
        keys = layer_norm(linear(region, packer.k_proj), packer.k_norm).view(-1, heads, head_dim)
        values = layer_norm(linear(region, packer.v_proj), packer.v_norm).view(-1, heads, head_dim)
        weights = torch.einsum("hd,khd->hk", query, keys).div(head_dim**0.5).softmax(-1)
        packed = point + linear(torch.einsum("hk,khd->hd", weights, values).flatten(), packer.o_proj)
        mlp = packer.mlp
        expected.append(linear(F.gelu(linear(packed, mlp.linear_1)), mlp.linear_2))
    with torch.no_grad():
        tokens = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    torch.testing.assert_close(tokens, torch.stack(expected))


@contextmanager
def pruned_sets():
    """Every forward's FastV ranking: its pruned positions `(batch, sequence)`."""
    seen, rank = [], fastv.FastVContext.rank

    def spy(context, *args):
        seen.append(rank(context, *args))
        return seen[-1]

    fastv.FastVContext.rank = spy
    try:
        yield seen
    finally:
        fastv.FastVContext.rank = rank


def test_fastv_keeps_the_vision_tokens_the_prompt_s_last_token_attends_to_most():
    """Against the attention map of the layer before `fastv_layer`, as Transformers' eager attention returns it."""
    model = rival_model(**RIVALS["fastv"])
    inputs = one_image(model.config)
    with pruned_sets() as seen, torch.no_grad():
        model(**inputs)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        maps = model(**inputs, output_attentions=True).attentions[model.config.fastv_layer - 1]
    weights = maps[0, :, -1, 1 : 1 + TOKENS].mean(dim=0)  # the last token's row, over the heads
    expected = torch.ones(inputs["input_ids"].shape, dtype=torch.bool)
    expected[0, 1 + weights.topk(4).indices] = False
    expected[0, 0], expected[0, 1 + TOKENS :] = False, False
    assert torch.equal(seen[0], expected)


def test_fastv_equals_the_decoder_run_without_the_pruned_tokens():
    """The layers from `fastv_layer` on, run on the kept tokens alone at their own positions, give the same logits."""
    model = rival_model(**RIVALS["fastv"])
    inputs = one_image(model.config)
    with pruned_sets() as seen, torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    decoder, layer = model.model.language_model, model.config.fastv_layer
    kept = ~seen[0][0]
    assert kept.sum() == inputs["input_ids"].shape[1] - TOKENS + 4
    states = outputs.hidden_states[layer][:, kept]  # after layer `fastv_layer - 1`
    positions = torch.arange(len(kept))[kept][None]
    position_embeddings = decoder.rotary_emb(states, positions)
    with torch.no_grad():
        for decoder_layer in decoder.layers[layer:]:
            states = decoder_layer(states, position_ids=positions, position_embeddings=position_embeddings)
        expected = model.lm_head(decoder.norm(states))
    torch.testing.assert_close(outputs.logits[:, kept], expected)


def test_fastv_ranks_with_the_prompt_s_last_token_in_training_as_in_generation():
    """A teacher-forced answer never takes part in the ranking: the pruned set is the prompt's own."""
    model = rival_model(**RIVALS["fastv"])
    prompt = one_image(model.config)
    answer = torch.tensor([[10, 11, 12]])
    input_ids = torch.cat([prompt["input_ids"], answer], dim=1)
    labels = torch.cat([torch.full(prompt["input_ids"].shape, -100), answer], dim=1)
    with pruned_sets() as seen, torch.no_grad():
        model(**prompt)
        model(input_ids=input_ids, pixel_values=prompt["pixel_values"], labels=labels)
    assert torch.equal(seen[1][:, : prompt["input_ids"].shape[1]], seen[0]) and not seen[1][:, -3:].any()


def test_fastv_decoding_steps_keep_the_prompt_s_pruned_tokens_out():
    """Each cached decoding step gives the logits of the whole sequence run anew, whose ranking is the prompt's."""
    model = rival_model(**RIVALS["fastv"])
    inputs = one_image(model.config)
    scored = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    generated = model.generate(**inputs, **scored)
    sequence, prompt_mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    for step_logits in generated.logits:
        with torch.no_grad():
            logits = model(sequence, pixel_values=inputs["pixel_values"], prompt_mask=prompt_mask).logits[:, -1]
        torch.testing.assert_close(step_logits, logits)
        sequence = torch.cat([sequence, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(sequence, generated.sequences)


@pytest.mark.parametrize("rival", ["deepstack", "sva"])
def test_a_new_refusion_block_reproduces_the_baseline(rival):
    torch.manual_seed(0)
    model = VisionRememberForConditionalGeneration(tiny_config(**RIVALS[rival])).eval()
    settings = {key: value for key, value in RIVALS[rival].items() if key != "refusion"}
    torch.manual_seed(0)
    baseline = VisionRememberForConditionalGeneration(tiny_config(**settings, use_vision_remember=False)).eval()
    inputs = one_image(model.config)
    inputs["pixel_values"] = torch.randn(1, 4, 3, 36, 36)  # AnyRes: the base view and 3 tiles
    inputs["image_sizes"] = torch.tensor([[36, 36]])
    inputs["input_ids"] = torch.tensor([[7] + [model.config.image_token_id] * 36 + [8, 9]])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, baseline(**inputs).logits)


@pytest.mark.parametrize("rival", list(RIVALS))
def test_rivals_save_and_reload(rival, tmp_path):
    """With their code: the checkpoint carries the files that define them (`test_hub` loads such a checkpoint's code
    in a fresh interpreter)."""
    model = rival_model(**RIVALS[rival])
    model.save_pretrained(tmp_path)
    assert {"deepstack.py", "spatial_vision_aggregator.py", "fastv.py"} <= {
        path.name for path in tmp_path.glob("*.py")
    }
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert reloaded.config.refusion == model.config.refusion
    assert reloaded.config.projector_type == model.config.projector_type
    inputs = one_image(model.config)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(refusion="deepstack", remember_after_layers=[0, 2]), "2 blocks do not divide them"),
        (dict(refusion="sva", interaction="global"), "use interaction='local'"),
        (dict(refusion="deepstak"), "refusion='deepstak' is unknown"),
        (dict(fastv_layer=0, use_vision_remember=False), r"needs a layer in \[1, 3\]"),
        (dict(fastv_layer=4, use_vision_remember=False), r"needs a layer in \[1, 3\]"),
        (dict(fastv_layer=1, fastv_keep_ratio=0.0, use_vision_remember=False), r"not a fraction in \(0, 1\]"),
        (dict(fastv_layer=1), "set use_vision_remember=False"),
    ],
)
def test_rival_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(Exception, match=message):
        tiny_config(**settings)


def test_fastv_refuses_attention_that_takes_no_4d_mask_before_encoding_any_image():
    model = rival_model(**RIVALS["fastv"])
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="load the model with attn_implementation='sdpa'"):
        model(**one_image(model.config))
