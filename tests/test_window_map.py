"""The token <-> window map is exact: each vision token's window holds exactly the patches it was pooled from.

The vision tower is replaced by position codes: every hidden state of view `v`, patch `(y, x)` carries `(v, y, x)`
and its layer index in its first channels, and the pooling projector's MLP is replaced by a zero-padding, so each
token entering the decoder is the exact mean of the codes of its `s x s` block. The test then runs the model's own
forward, captures what it hands Vision Remember (features, token positions, window index) and the decoder's input
embeddings, and checks every token against its window.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import BaseModelOutput

from vr_hf.modeling import VisionRememberModel
from vr_hf.modeling.image_layout import ImageLayout
from vr_hf.modeling.vision_remember import concat_windows
from vr_hf.tiny import tiny_config


VIEW, Y, X, LAYER = range(4)  # code channels
VIEWS_PER_ID = 100  # a view's id is image * 100 + view within the image; padded views are -1
GRID = 12  # patches per side of a view in `tiny_config` (36 px / 3 px patches): ratios 2, 3 and 4 all tile it


class PadChannels(nn.Module):
    """Stands in for the projector MLP: vision channels copied unchanged into the decoder width."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.pad(tokens, (0, self.width - tokens.shape[-1]))


def position_codes(config, pixel_values: torch.Tensor, output_hidden_states: bool = False, **kwargs):
    """Vision tower stand-in: the view's id is read from its pixels; hidden state `l` of patch `(y, x)` is
    `(id, y, x, l, 0, ...)`, patches row-major as a ViT flattens them."""
    grid, width = config.grid_size, config.vision_config.hidden_size
    num_views = len(pixel_values)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    states = []
    for layer in range(config.vision_config.num_hidden_layers + 1):
        codes = torch.zeros(num_views, grid * grid, width)
        codes[:, :, VIEW] = pixel_values[:, 0, 0, 0, None].float()
        codes[:, :, Y] = y.flatten().float()
        codes[:, :, X] = x.flatten().float()
        codes[:, :, LAYER] = layer
        states.append(codes)
    return BaseModelOutput(last_hidden_state=states[-1], hidden_states=tuple(states))


def position_coded_model(**overrides) -> VisionRememberModel:
    torch.manual_seed(0)
    config = tiny_config(projector_type="avg_pool", **overrides)
    model = VisionRememberModel(config).eval()
    model.vision_tower.forward = lambda pixel_values, **kwargs: position_codes(config, pixel_values, **kwargs)
    model.multi_modal_projector.mlp = PadChannels(config.text_config.hidden_size)
    return model


def run_and_capture(model: VisionRememberModel, image_sizes: list) -> dict:
    """One sample per image (prompts of different lengths, right-padded); returns what the forward handed Vision
    Remember and the decoder."""
    config = model.config
    layout = ImageLayout.from_config(config)
    anyres = config.image_grid_pinpoints is not None
    sizes = image_sizes if anyres else [None] * len(image_sizes)

    image_tokens = [[config.image_token_id] * layout.num_tokens(size) for size in sizes]
    samples = [[1] * (3 + index) + tokens + [2, 3] for index, tokens in enumerate(image_tokens)]
    length = max(map(len, samples))
    input_ids = torch.tensor([sample + [0] * (length - len(sample)) for sample in samples])
    attention_mask = torch.tensor([[1] * len(sample) + [0] * (length - len(sample)) for sample in samples])

    view_size = config.vision_config.image_size
    max_views = max(layout.num_views(size) for size in sizes)
    pixel_values = torch.full((len(sizes), max_views, 3, view_size, view_size), -1.0)
    for image, size in enumerate(sizes):
        for view in range(layout.num_views(size)):
            pixel_values[image, view] = image * VIEWS_PER_ID + view
    if not anyres:
        pixel_values = pixel_values[:, 0]

    captured = {}
    prepare = model.vision_remember.prepare

    def capture_prepare(layout, features, windows):
        captured["token_index"] = layout.token_index
        captured["features"] = torch.cat(features)
        captured["window_index"] = concat_windows(windows, [len(image) for image in features])
        captured["context"] = prepare(layout, features, windows)
        return captured["context"]

    def capture_embeds(module, args, kwargs):
        captured["inputs_embeds"] = kwargs["inputs_embeds"]

    model.vision_remember.prepare = capture_prepare
    handle = model.language_model.register_forward_pre_hook(capture_embeds, with_kwargs=True)
    try:
        with torch.no_grad():
            model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_sizes=torch.tensor(image_sizes) if anyres else None,
                attention_mask=attention_mask,
            )
    finally:
        handle.remove()
        del model.vision_remember.prepare
    captured["token_batch"] = captured["token_index"] // input_ids.shape[1]
    captured["tokens"] = captured["inputs_embeds"].flatten(0, 1)[captured["token_index"]]
    check_prepared_windows(model, captured)
    return captured


def check_prepared_windows(model: VisionRememberModel, captured: dict):
    """The context the blocks read holds, for every token with a window, exactly the normalised features its window
    names, and only those attend (for `global` interaction: every normalised feature of its image)."""
    context, windows = captured["context"], captured["window_index"]
    normalized = model.vision_remember.normalize_features(captured["features"])
    windowed = (windows >= 0).any(dim=1)
    assert torch.equal(context.windowed[:, 0].bool(), windowed)
    if model.config.interaction == "global":
        torch.testing.assert_close(context.image_features, normalized)
        return
    torch.testing.assert_close(context.window_features[windowed], normalized[windows[windowed].clamp(min=0)])
    assert torch.equal(context.window_mask[windowed], windows[windowed] >= 0)


def decode_window(config, features: torch.Tensor, window: torch.Tensor) -> list[tuple[int, int, int]]:
    """`(view id, y, x)` of each feature row in `window`, after checking every level carries the same patch."""
    rows = features[window[window >= 0]]
    width = config.vision_config.hidden_size
    levels = rows.unflatten(-1, (-1, width))
    assert levels.shape[1] == len(config.remember_feature_layers)
    for level, layer in enumerate(config.remember_feature_layers):
        assert torch.all(levels[:, level, LAYER] == layer % (config.vision_config.num_hidden_layers + 1))
        assert torch.equal(levels[:, level, :LAYER], levels[:, 0, :LAYER])
    return [tuple(int(value) for value in row) for row in levels[:, 0, :LAYER]]


def pooled_block(config, token: torch.Tensor) -> tuple[int, int, int]:
    """`(view id, block row, block column)` a token was pooled from, read off its mean code."""
    s = config.downsample_factor
    view = token[VIEW].item()
    row, column = ((token[Y] - (s - 1) / 2) / s).item(), ((token[X] - (s - 1) / 2) / s).item()
    for value in (view, row, column):
        assert abs(value - round(value)) < 1e-4, f"token {token[:LAYER].tolist()} is not the mean of one aligned block"
    return round(view), round(row), round(column)


def block_patches(config, view: int, row: int, column: int) -> set[tuple[int, int, int]]:
    s = config.downsample_factor
    return {(view, y, x) for y in range(row * s, row * s + s) for x in range(column * s, column * s + s)}


def check_windows(model: VisionRememberModel, captured: dict) -> list[list]:
    """Every token's window is exactly its pooled block and its value the mean of the window; newlines have no
    window. Returns, per image, its token sequence: `(view within image, block row, block column)` or "newline"."""
    config = model.config
    features, windows, tokens = captured["features"], captured["window_index"], captured["tokens"]
    per_image = [[] for _ in range(int(captured["token_batch"].max()) + 1)]
    for sample, window, token in zip(captured["token_batch"].tolist(), windows, tokens):
        if window[0] < 0:
            assert torch.all(window == -1), "a newline token must have no window at all"
            torch.testing.assert_close(token, model.image_newline)
            per_image[sample].append("newline")
            continue
        view, row, column = pooled_block(config, token)
        image, view_in_image = divmod(view, VIEWS_PER_ID)
        assert image == sample, "a token was pooled from another image's view"
        assert token[LAYER] == config.vision_config.num_hidden_layers  # the projector reads the last hidden state

        patches = decode_window(config, features, window)
        assert len(patches) == config.downsample_factor**2 == len(set(patches))
        assert set(patches) == block_patches(config, view, row, column)
        window_mean = features[window][:, :LAYER].mean(dim=0)
        torch.testing.assert_close(token[:LAYER], window_mean, atol=1e-5, rtol=0)
        per_image[sample].append((view_in_image, row, column))
    return per_image


def base_view(n: int) -> list:
    return [(0, row, column) for row in range(n) for column in range(n)]


def tile_grid(n: int, tile_columns: int, rows, columns) -> list:
    """LLaVA-NeXT's stitched tile grid, restricted to the kept token `rows` and `columns`, a newline after each row."""
    sequence = []
    for row in rows:
        for column in columns:
            tile = (row // n) * tile_columns + column // n
            sequence.append((1 + tile, row % n, column % n))
        sequence.append("newline")
    return sequence


@pytest.mark.parametrize("downsample_factor", [2, 3, 4])
@pytest.mark.parametrize("interaction", ["local", "deformable"])
def test_single_view_windows(downsample_factor, interaction):
    model = position_coded_model(
        image_grid_pinpoints=None, interaction=interaction, downsample_factor=downsample_factor
    )
    captured = run_and_capture(model, [(36, 36), (50, 20)])
    n = GRID // downsample_factor
    assert captured["features"].shape[0] == 2 * GRID * GRID
    assert check_windows(model, captured) == [base_view(n), base_view(n)]


@pytest.mark.parametrize("downsample_factor", [2, 3, 4])
def test_anyres_windows_without_unpadding(downsample_factor):
    """A square image on the 2x2-tile pinpoint: the base view, then every token of the 2n x 2n tile grid."""
    model = position_coded_model(downsample_factor=downsample_factor)
    captured = run_and_capture(model, [(72, 72)])
    n = GRID // downsample_factor
    assert captured["features"].shape[0] == 5 * GRID * GRID
    (sequence,) = check_windows(model, captured)
    assert sequence == base_view(n) + tile_grid(n, 2, range(2 * n), range(2 * n))


@pytest.mark.parametrize(
    "image_size, tile_columns, kept_rows, kept_columns",
    [
        # 20x72 goes on the 36x72 pinpoint (1x2 tiles, 4x8 tokens); unpadding keeps token rows 1-2 of 0-3.
        ((20, 72), 2, range(1, 3), range(8)),
        # 72x20 goes on the 72x36 pinpoint (2x1 tiles, 8x4 tokens); unpadding keeps token columns 1-2 of 0-3.
        ((72, 20), 1, range(8), range(1, 3)),
    ],
    ids=["wide-unpads-rows", "tall-unpads-columns"],
)
def test_anyres_windows_with_unpadding(image_size, tile_columns, kept_rows, kept_columns):
    model = position_coded_model(downsample_factor=3)
    captured = run_and_capture(model, [image_size])
    (sequence,) = check_windows(model, captured)
    assert sequence == base_view(4) + tile_grid(4, tile_columns, kept_rows, kept_columns)


def test_anyres_windows_for_a_batch_of_mixed_images():
    """Window rows count over the views of all images: later images' windows point past earlier images' views."""
    model = position_coded_model(downsample_factor=3)
    sizes = [(20, 72), (72, 72), (72, 20)]
    captured = run_and_capture(model, sizes)
    assert captured["features"].shape[0] == (3 + 5 + 3) * GRID * GRID
    assert check_windows(model, captured) == [
        base_view(4) + tile_grid(4, 2, range(1, 3), range(8)),
        base_view(4) + tile_grid(4, 2, range(8), range(8)),
        base_view(4) + tile_grid(4, 1, range(8), range(1, 3)),
    ]


def test_global_interaction_gives_each_token_exactly_its_own_image():
    """Each token of an image attends to every feature of that image (shared keys, in image order), and to no other
    image's; its local window is still the one it was pooled from."""
    model = position_coded_model(downsample_factor=3, interaction="global")
    sizes = [(72, 72), (20, 72)]  # 5 views and 3 views
    captured = run_and_capture(model, sizes)
    config, context, features = model.config, captured["context"], captured["features"]
    views_per_image = [5, 3]
    assert context.features_per_image == [views * GRID * GRID for views in views_per_image]
    tokens = [model.image_layout.num_tokens(size) for size in sizes]
    assert context.tokens_per_image == tokens
    start = 0
    for image, count in enumerate(context.features_per_image):
        patches = decode_window(config, features, torch.arange(start, start + count))
        views = [image * VIEWS_PER_ID + view for view in range(views_per_image[image])]
        every_patch = {(view, y, x) for view in views for y in range(GRID) for x in range(GRID)}
        assert len(patches) == len(set(patches)) and set(patches) == every_patch
        start += count
    assert check_windows(model, captured)[1] == base_view(4) + tile_grid(4, 2, range(1, 3), range(8))
