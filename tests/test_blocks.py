"""The Vision Remember blocks against hand-computed references, in every attention implementation."""

import pytest
import torch
from test_fast_paths import STAND_IN, varlen_stand_in
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vr_hf.modeling import vision_remember_attention
from vr_hf.modeling.vision_remember import OutputProjection, TokenLayout, VisionRemember
from vr_hf.tiny import tiny_config


IMPLEMENTATIONS = ["eager", "sdpa", STAND_IN]
SEQUENCE = 12
# Sample 0: vision tokens at 3..6, of two turns (a prompt ends at 5); sample 1: vision tokens at 5..9, one turn.
# Each token's window: 9 rows of the features.
PLACEHOLDERS = [range(3, 7), range(5, 10)]
PROMPT_ENDS = [[5], []]


@pytest.fixture
def stand_in_flash(monkeypatch):
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, STAND_IN, varlen_stand_in)
    monkeypatch.setattr(vision_remember_attention, "flash_problems", lambda module, tensor: [])


def blocks(implementation: str = "eager", **overrides) -> VisionRemember:
    config = tiny_config(identity_init=False, **overrides)
    config._attn_implementation = implementation
    torch.manual_seed(0)
    module = VisionRemember(config)
    for submodule in module.modules():
        if isinstance(submodule, OutputProjection):
            torch.nn.init.normal_(submodule.weight, std=0.5)
    return module.eval()


def layout_and_inputs(module: VisionRemember, pooled: torch.Tensor | None = None):
    """Two samples, their vision tokens' windows of random features, random hidden states and pooled text."""
    config = module.config
    generator = torch.Generator().manual_seed(1)
    placeholders = torch.zeros(2, SEQUENCE, dtype=torch.bool)
    turns = torch.zeros(2, SEQUENCE, dtype=torch.long)
    for row, (positions, ends) in enumerate(zip(PLACEHOLDERS, PROMPT_ENDS)):
        placeholders[row, list(positions)] = True
        for end in ends:
            turns[row, end:] += 1
    num_tokens = int(placeholders.sum())
    features = torch.randn(num_tokens * 9 + 5, config.remember_feature_size, generator=generator)
    windows = torch.randperm(len(features), generator=generator)[: num_tokens * 9].view(num_tokens, 9)
    if pooled is None and module.text_guidance:
        pooled = ~placeholders & (torch.rand(2, SEQUENCE, generator=generator) > 0.3)
        pooled[:, :2] = pooled[0, 8] = (
            True  # every turn pools two positions or more, sample 0's second more than its first
        )
    hidden_states = torch.randn(2, SEQUENCE, config.text_config.hidden_size, generator=generator)
    layout = TokenLayout.from_turns(placeholders, turns, pooled, torch.device("cpu"))
    return layout, features, windows, hidden_states, turns, pooled


def test_text_guided_token_is_the_masked_max_of_the_prompt_up_to_its_turn():
    module = blocks()
    layout, _, _, hidden_states, turns, pooled = layout_and_inputs(module)
    tokens = module.layers["0"].self_attention.text_guided_tokens(hidden_states, layout)
    assert layout.guidance_rows.tolist() == [0, 0, 1]  # sample 0's two turns, sample 1's one
    for row, (sample, turn) in enumerate([(0, 0), (0, 1), (1, 0)]):
        prompt = hidden_states[sample][pooled[sample] & (turns[sample] <= turn)]
        assert len(prompt) > 1
        assert torch.equal(tokens[row], prompt.max(dim=0).values)


def test_text_guided_token_of_a_sample_without_prompt_is_zero_and_masked():
    module = blocks()
    pooled = torch.zeros(2, SEQUENCE, dtype=torch.bool)
    pooled[0, :3] = True
    layout, _, _, hidden_states, _, _ = layout_and_inputs(module, pooled)
    tokens = module.layers["0"].self_attention.text_guided_tokens(hidden_states, layout)
    assert torch.equal(tokens[2], torch.zeros_like(tokens[2]))
    assert layout.key_mask[:, -1].tolist() == [True, True, False]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_self_attention_reads_its_turn_and_the_turns_before(implementation, stand_in_flash):
    """The bidirectional self-attention by hand: each vision token's query attends, per head, to the normalised vision
    tokens of its sample's turns up to its own and to its turn's text-guided token, the max-pool of the text up to the
    end of its turn's prompt."""
    module = blocks(implementation)
    layout, features, windows, hidden_states, turns, pooled = layout_and_inputs(module)
    attention = module.layers["0"].self_attention
    with torch.no_grad():
        output = attention(hidden_states, module.prepare(layout, [features], [windows]))
        heads, head_dim = attention.num_heads, attention.head_dim
        for sample, positions in enumerate(PLACEHOLDERS):
            for position in positions:
                turn = turns[sample, position]
                keys = [other for other in positions if turns[sample, other] <= turn]
                states = [hidden_states[sample, keys]]
                states.append(hidden_states[sample][pooled[sample] & (turns[sample] <= turn)].amax(dim=0)[None])
                states = attention.norm(torch.cat(states))
                query = attention.q_proj(attention.norm(hidden_states[sample, position])).view(heads, head_dim)
                key = attention.k_proj(states).view(-1, heads, head_dim)
                value = attention.v_proj(states).view(-1, heads, head_dim)
                weights = torch.softmax(torch.einsum("hd,khd->hk", query, key) / head_dim**0.5, dim=-1)
                update = attention.out_proj(torch.einsum("hk,khd->hd", weights, value).flatten())
                expected = hidden_states[sample, position] + update
                torch.testing.assert_close(output[sample, position], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vision_tokens_attend_to_later_vision_tokens(implementation, stand_in_flash):
    """Bidirectional: the first vision token's update changes with the last one, in every implementation."""
    module = blocks(implementation)
    layout, features, windows, hidden_states, _, _ = layout_and_inputs(module)
    self_attention = module.layers["0"].self_attention
    context = module.prepare(layout, [features], [windows])
    changed = hidden_states.clone()
    changed[1, PLACEHOLDERS[1][-1]] += 1.0
    with torch.no_grad():
        before, after = (self_attention(states, context) for states in (hidden_states, changed))
    first = PLACEHOLDERS[1][0]
    assert not torch.allclose(before[1, first], after[1, first])
    torch.testing.assert_close(before[0], after[0])  # the other sample's tokens never see it


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_turn_never_reads_a_later_turn(implementation, stand_in_flash):
    """Sample 0's second turn reads its first; nothing of the second turn, vision token or text, reaches the first."""
    module = blocks(implementation)
    layout, features, windows, hidden_states, _, _ = layout_and_inputs(module)
    self_attention = module.layers["0"].self_attention
    context = module.prepare(layout, [features], [windows])
    later, earlier = hidden_states.clone(), hidden_states.clone()
    later[0, 6] += 1.0  # a vision token of the second turn
    later[0, 7:] += 1.0  # the second turn's text
    earlier[0, 3] += 1.0  # a vision token of the first turn
    with torch.no_grad():
        output, with_later, with_earlier = (
            self_attention(states, context) for states in (hidden_states, later, earlier)
        )
    torch.testing.assert_close(with_later[0, 3:5], output[0, 3:5])
    assert not torch.allclose(with_earlier[0, 5], output[0, 5])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_attention_is_one_query_over_its_own_window(implementation, stand_in_flash):
    """Paper eq. 2, by hand: each token's expanded query attends, per head, to the normalised features of its own
    window as keys and values (no projections); the result comes back through the output projection."""
    module = blocks(implementation)
    layout, features, windows, hidden_states, _, _ = layout_and_inputs(module)
    cross = module.layers["0"].cross_attention
    with torch.no_grad():
        output = cross(hidden_states, module.prepare(layout, [features], [windows]))
        normalized = module.normalize_features(features)
        heads, head_dim = cross.num_heads, cross.head_dim
        for token, (sample, position) in enumerate((divmod(index, SEQUENCE) for index in layout.token_index.tolist())):
            state = hidden_states[sample, position]
            query = cross.query_out(cross.act(cross.query_up(cross.norm(state)))).view(heads, head_dim)
            window = normalized[windows[token]].view(9, heads, head_dim)
            weights = torch.softmax(torch.einsum("hd,whd->hw", query, window) / head_dim**0.5, dim=-1)
            update = cross.out_proj(torch.einsum("hw,whd->hd", weights, window).flatten())
            torch.testing.assert_close(output[sample, position], state + update, atol=1e-5, rtol=1e-4)
    text = torch.ones(2, SEQUENCE, dtype=torch.bool)
    text.view(-1)[layout.token_index] = False
    assert torch.equal(output[text], hidden_states[text])


def test_tokens_without_a_window_are_left_alone():
    """AnyRes newline tokens have no window: the cross-attention leaves them as they are."""
    module = blocks()
    layout, features, windows, hidden_states, _, _ = layout_and_inputs(module)
    windows[2] = -1
    with torch.no_grad():
        output = module.layers["0"].cross_attention(hidden_states, module.prepare(layout, [features], [windows]))
    sample, position = divmod(int(layout.token_index[2]), SEQUENCE)
    assert torch.equal(output[sample, position], hidden_states[sample, position])
    assert not torch.equal(output.flatten(0, 1)[layout.token_index[3]], hidden_states[0, 6])


def test_feature_levels_are_normalised_each_on_its_own():
    module = blocks()
    features = torch.randn(5, module.config.remember_feature_size)
    levels = features.chunk(len(module.feature_norms), dim=-1)
    expected = torch.cat([F.layer_norm(level, level.shape[-1:]) for level in levels], dim=-1)
    torch.testing.assert_close(module.normalize_features(features), expected)  # the norms start as the identity map


def deformable_points(module: VisionRemember, points: list[tuple[float, float]]):
    """Make every token sample exactly `points` (`(x, y)` in the window's [-1, 1] frame)."""
    offsets = module.layers["0"].cross_attention.sampling_offsets
    with torch.no_grad():
        offsets.weight.zero_()
        offsets.bias.copy_(torch.atanh(torch.tensor(points, dtype=torch.float32).clamp(-0.999, 0.999)).flatten())


def test_deformable_points_read_the_patches_they_name():
    """At a patch centre a point reads that patch; at the window's edges and corners it reads the border patches,
    never zero padding (a constant window reads as that constant everywhere)."""
    module = blocks(interaction="deformable", deformable_points=4)
    cross = module.layers["0"].cross_attention
    centre = 2 / 3  # patch centres of a 3x3 window sit at -2/3, 0 and 2/3
    deformable_points(module, [(centre, -centre), (-centre, 0.0), (1.0, 1.0), (0.0, -1.0)])
    window = torch.randn(5, 9, module.config.remember_feature_size)
    queries = torch.randn(5, module.config.text_config.hidden_size)
    sampled = cross.sample_points(queries, window)
    torch.testing.assert_close(sampled[:, 0], window[:, 2])  # row 0, column 2
    torch.testing.assert_close(sampled[:, 1], window[:, 3])  # row 1, column 0
    torch.testing.assert_close(sampled[:, 2], window[:, 8], atol=1e-3, rtol=0)  # the corner: the corner patch
    torch.testing.assert_close(sampled[:, 3], window[:, 1])  # the top edge above the centre column: row 0, column 1
    constant = torch.full_like(window, 0.7)
    torch.testing.assert_close(cross.sample_points(queries, constant), torch.full_like(sampled, 0.7))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_global_cross_attention_is_one_query_over_its_own_image(implementation, stand_in_flash):
    """`global` by hand: each token's expanded query attends to every normalised feature of its own image (the keys
    its image's tokens share), and to no other image's."""
    module = blocks(implementation, interaction="global")
    layout, _, _, hidden_states, _, _ = layout_and_inputs(module)
    counts = [len(positions) for positions in PLACEHOLDERS]
    features = [torch.randn(rows, module.config.remember_feature_size) for rows in (7, 11)]
    windows = [torch.zeros(count, 1, dtype=torch.long) for count in counts]  # every token has a (local) window
    cross = module.layers["0"].cross_attention
    with torch.no_grad():
        output = cross(hidden_states, module.prepare(layout, features, windows))
        heads, head_dim = cross.num_heads, cross.head_dim
        images = [image for image, count in enumerate(counts) for _ in range(count)]
        for token, (sample, position) in enumerate((divmod(index, SEQUENCE) for index in layout.token_index.tolist())):
            state = hidden_states[sample, position]
            query = cross.query_out(cross.act(cross.query_up(cross.norm(state)))).view(heads, head_dim)
            keys = module.normalize_features(features[images[token]]).view(-1, heads, head_dim)
            weights = torch.softmax(torch.einsum("hd,fhd->hf", query, keys) / head_dim**0.5, dim=-1)
            update = cross.out_proj(torch.einsum("hf,fhd->hd", weights, keys).flatten())
            torch.testing.assert_close(output[sample, position], state + update, atol=1e-5, rtol=1e-4)
