"""Vision Remember: rewrite the vision tokens' hidden states from the uncompressed vision features.

The blocks here know nothing about any particular VLM. Per forward pass they get:

- a `TokenLayout`, read from the image placeholders before any vision work is queued: where the vision tokens sit in
  the decoder's `(batch, sequence)`, how the self-attention lays them out per sample, and the `(batch, sequence)`
  positions whose hidden states feed the text-guided token;
- `features`: multi-level vision features, `(num_feature_positions, L * Dv)`;
- `window_index`: per vision token, the rows of `features` it was compressed from, `(num_tokens, window)`, -1 where
  none.

`VisionRemember.prepare` turns these into a `RememberContext`, passed to the decoder as the keyword argument
`vision_remember`; decoder layers forward it to their forward hooks, which run the block after each chosen layer.
All sizes come from the layout and the tensors' shapes: on SDPA and eager attention nothing in `prepare` or the blocks
waits on the device, so the decoder with its blocks compiles as one graph (FlashAttention's packing by boolean masks
reads their counts from the device).

Attention follows the model's `attn_implementation` (`vision_remember_attention`).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN

from .configuration_vision_remember_settings import VisionRememberSettings
from .vision_remember_attention import (
    AttentionSettings,
    attend,
    attend_images,
    attend_varlen,
    attend_windows,
    backend,
    normalize_levels,
)
from .vision_remember_triton import feature_statistics, runs_triton_windows, windowed_cross_attention


NO_WINDOW = -1


class OutputProjection(nn.Linear):
    """A residual sub-layer's output projection: zero at initialisation with `identity_init`, so the sub-layer starts
    as the identity and a new model reproduces the model without it."""


class SamplingOffsets(nn.Linear):
    """Predicts the deformable sampling points, `(x, y)` in `[-1, 1]` of the window after a tanh."""

    def __init__(self, in_features: int, num_points: int):
        super().__init__(in_features, 2 * num_points)
        self.num_points = num_points


def fork_rng_on(device: torch.device):
    """`torch.random.fork_rng` for the CPU and `device`: random numbers drawn inside leave the global streams as they
    were."""
    device = torch.device(device)
    accelerator = [] if device.type in ("cpu", "meta") else [device]
    return torch.random.fork_rng(devices=accelerator, device_type=device.type if accelerator else "cuda")


def rng_state_accessors(device: torch.device) -> tuple:
    """`(get_state, set_state)` of the random stream that initialises tensors on `device`."""
    if device.type in ("cpu", "meta"):
        return torch.get_rng_state, torch.set_rng_state
    module = torch.get_device_module(device)
    return partial(module.get_rng_state, device), partial(module.set_rng_state, device=device)


def init_vision_remember_weights(module: nn.Module, identity_init: bool):
    """The Vision Remember parts whose init is not the generic one: zero output projections (identity at init) and
    the deformable sampling points on a ring halfway between the window's centre and its border."""
    if isinstance(module, OutputProjection) and identity_init:
        init.zeros_(module.weight)
        init.zeros_(module.bias)
    elif isinstance(module, SamplingOffsets):
        angles = torch.arange(module.num_points) * (2 * math.pi / module.num_points)
        ring = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten() * 0.5
        init.zeros_(module.weight)
        init.copy_(module.bias, torch.atanh(ring))


def concat_windows(windows: list[torch.Tensor], feature_counts: list[int]) -> torch.Tensor:
    """Per-image `(tokens, window)` rows of each image's own features to one `(tokens, widest window)` of rows of all
    images' features concatenated, padded with `NO_WINDOW`."""
    width = max(window.shape[1] for window in windows)
    starts = [sum(feature_counts[:index]) for index in range(len(windows))]
    return torch.cat(
        [
            F.pad(torch.where(window == NO_WINDOW, NO_WINDOW, window + start), (0, width - window.shape[1]), value=-1)
            for window, start in zip(windows, starts)
        ]
    )


def to_device(tensors: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    """Small host tensors on `device`, in one copy that does not wait for the work queued there: their bytes are
    packed into one pinned buffer (each at a multiple of 8 bytes, so that any dtype views it) and split there. None
    stays None."""
    present = {name: tensor for name, tensor in tensors.items() if tensor is not None}
    chunks = [tensor.contiguous().view(-1).view(torch.uint8) for tensor in present.values()]
    starts = [0]
    for chunk in chunks:
        starts.append(starts[-1] + -(-len(chunk) // 8) * 8)
    buffer = torch.empty(starts[-1], dtype=torch.uint8, pin_memory=device.type == "cuda")
    for chunk, start in zip(chunks, starts):
        buffer[start : start + len(chunk)] = chunk
    buffer = buffer.to(device, non_blocking=True)
    moved = {
        name: buffer[start : start + len(chunk)].view(tensor.dtype).view(tensor.shape)
        for (name, tensor), chunk, start in zip(present.items(), chunks, starts)
    }
    return {name: moved.get(name) for name in tensors}


def block_windows(height: int, width: int, side: int) -> torch.Tensor:
    """Rows of a row-major `height x width` patch grid that each `side x side` block covers, blocks in row-major order:
    `(height * width / side**2, side**2)`, each block's rows in row-major order."""
    grid = torch.arange(height * width).view(height // side, side, width // side, side)
    return grid.permute(0, 2, 1, 3).reshape(-1, side * side)


@dataclass
class TokenLayout:
    """Where the vision tokens are, and how the bidirectional self-attention groups them.

    A sample's turns end where its prompts do (`conversation_turns`). The self-attention runs on rows, one per turn
    with vision tokens: a row's queries are its turn's vision tokens; its keys are the vision tokens of its sample's
    turns up to its own, and its text-guided token, the max-pool of the sample's text up to the end of the turn's
    prompt. A turn's vision tokens thus never read a later turn, and never change once their turn's answer begins.

    Indices address the flattened `(batch * sequence)` hidden states, and the self-attention's keys address the vision
    tokens followed by the rows' text-guided tokens, so that each gather and scatter is one kernel. Everything is
    computed on the host and reaches the device in one copy: nothing here waits on the device."""

    token_index: torch.Tensor  # (N,): each vision token's row in the flattened hidden states, sample by sample
    token_slot: torch.Tensor  # (N,): its place in the flattened `(rows, queries)` layout
    query_index: torch.Tensor  # (rows, queries): each row's vision tokens (0 where padded)
    key_index: torch.Tensor  # (rows, keys): each row's keys, the last one its text-guided token (0 where padded)
    key_mask: torch.Tensor  # (rows, keys): keys present
    packed_key_index: torch.Tensor  # (sum of keys present,): the present keys, row after row
    query_lengths: torch.Tensor  # (rows,) int32
    key_lengths: torch.Tensor  # (rows,) int32: keys present per row
    max_query_length: int
    max_key_length: int
    guidance_rows: torch.Tensor | None  # (rows,): each row's sample; None without text guidance
    unguided: torch.Tensor | None  # (rows, sequence, 1): the positions that do not feed each row's text-guided token
    has_guidance: torch.Tensor | None  # (rows, 1): rows whose text-guided token pools any text

    @classmethod
    def from_turns(
        cls, placeholders: torch.Tensor, turns: torch.Tensor, pooled: torch.Tensor | None, device: torch.device
    ) -> "TokenLayout":
        """All on the host, `(batch, sequence)`: `placeholders`, where the vision tokens are; `turns`, each position's
        turn (how many of its sample's prompts end at or before it); `pooled`, the text that may feed a text-guided
        token (None without text guidance)."""
        sequence = placeholders.shape[1]
        token_batch, token_position = placeholders.nonzero(as_tuple=True)
        token_turn = turns[token_batch, token_position]
        rows, query_lengths = torch.unique_consecutive(token_batch * (sequence + 1) + token_turn, return_counts=True)
        row_batch, row_turn = rows // (sequence + 1), rows % (sequence + 1)
        row_end = query_lengths.cumsum(0)
        query_index, query_mask = padded_runs(row_end - query_lengths, query_lengths)
        # A row's keys: its sample's vision tokens up to its turn's last, and its text-guided token.
        key_start = torch.searchsorted(token_batch, row_batch)
        key_index, key_mask = padded_runs(key_start, row_end - key_start)
        guidance = dict(guidance_rows=None, unguided=None, has_guidance=None)
        if pooled is not None:
            pooled = pooled[row_batch] & (turns[row_batch] <= row_turn[:, None])
            has_guidance = pooled.any(dim=1, keepdim=True)
            guidance = dict(guidance_rows=row_batch, unguided=~pooled[..., None], has_guidance=has_guidance)
            text_guided = len(token_batch) + torch.arange(len(rows))  # keys after the vision tokens'
            key_index = torch.cat([key_index, text_guided[:, None]], dim=1)
            key_mask = torch.cat([key_mask, has_guidance], dim=1)
        key_lengths = key_mask.sum(dim=1, dtype=torch.int32)
        on_host = dict(
            token_index=token_batch * sequence + token_position,
            token_slot=query_mask.flatten().nonzero().flatten(),
            query_index=query_index,
            key_index=key_index,
            key_mask=key_mask,
            packed_key_index=key_index[key_mask],
            query_lengths=query_lengths.int(),
            key_lengths=key_lengths,
            **guidance,
        )
        lengths = dict(max_query_length=int(query_lengths.max()), max_key_length=int(key_lengths.max()))
        return cls(**to_device(on_host, device), **lengths)


def padded_runs(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of consecutive indices, `starts[i]` on for `lengths[i]`, padded to the longest: `(runs, longest)` indices
    (0 where padded) and the mask of those in a run."""
    columns = torch.arange(int(lengths.max()))[None, :]
    mask = columns < lengths[:, None]
    return torch.where(mask, starts[:, None] + columns, 0), mask


@dataclass
class RememberContext:
    """Everything the Vision Remember blocks need in one forward pass, computed once and shared by all blocks.

    The cross-attention's keys: for `local` and `deformable` interaction each token's window of normalised features;
    for `global` each image's normalised features, shared by all of its tokens; for the Triton kernel the raw features,
    their statistics per level and each token's window of them, which the kernel gathers and normalises itself."""

    vision_remember: "VisionRemember"
    layout: TokenLayout
    windowed: torch.Tensor  # (N, 1): 1 for tokens with features to attend to, 0 for AnyRes newlines
    window_features: torch.Tensor | None = None  # (N, W, L * Dv)
    window_mask: torch.Tensor | None = None  # (N, W): True where the window has a feature
    features: torch.Tensor | None = None  # (all images' features, L * Dv), raw, for the kernel
    feature_statistics: torch.Tensor | None = None  # (all images' features, L, 2): each level's mean and 1 / std
    window_index: torch.Tensor | None = None  # (N, W): rows of `features`, for the kernel
    image_features: torch.Tensor | None = None  # (all images' features, L * Dv), image after image
    tokens_per_image: list[int] | None = None
    features_per_image: list[int] | None = None
    image_lengths: tuple[torch.Tensor, torch.Tensor] | None = None  # both, int32 on the device
    # A training batch without images runs the blocks on a stand-in image, to give every parameter a (zero) gradient
    # on every rank: a zero tensor that carries the stand-in's graph, added in place of every update.
    stand_in: torch.Tensor | None = None

    def remember(self, layer_index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.vision_remember.layers[str(layer_index)](hidden_states, self)

    def weigh(self, update: torch.Tensor) -> torch.Tensor:
        """A sub-layer's update as it is added: itself, or with a stand-in, zero but still in the graph."""
        return update if self.stand_in is None else update * 0 + self.stand_in


def remember_after_layer(layer_index: int, module, args, kwargs, output):
    """Forward hook on a decoder layer: runs its Vision Remember block when the call carries a context."""
    context = kwargs.get("vision_remember")
    if context is None:
        return None
    return context.remember(layer_index, output)


class TokenFeatureCrossAttention(nn.Module):
    """Each vision token queries the uncompressed features it was compressed from (paper eq. 2).

    The query is expanded by an MLP from the decoder width to the multi-level feature width `L * Dv`; keys and values
    are the features themselves, without projections.
    """

    def __init__(self, config: VisionRememberSettings):
        super().__init__()
        text_size, feature_size = config.text_config.hidden_size, config.remember_feature_size
        self.num_heads = config.cross_attention_heads
        self.head_dim = feature_size // self.num_heads
        self.interaction = config.interaction
        self.norm = nn.RMSNorm(text_size, eps=config.text_config.rms_norm_eps)
        self.query_up = nn.Linear(text_size, text_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.query_out = nn.Linear(text_size, feature_size)
        self.out_proj = OutputProjection(feature_size, text_size)
        if config.interaction == "deformable":
            self.sampling_offsets = SamplingOffsets(text_size, config.deformable_points)
        self.attention = AttentionSettings(config, self.head_dim)

    def sample_points(self, queries_in: torch.Tensor, window_features: torch.Tensor) -> torch.Tensor:
        """Bilinearly sample `num_points` features per token at learned points of its `s x s` window: `(x, y)` in
        `[-1, 1]` spans the window from the outer edge of its first patch to that of its last; beyond the outermost
        patch centres a point reads the border patch (never zeros), so every point reads a mix of real features."""
        num_tokens, window, channels = window_features.shape
        side = int(window**0.5)
        grid_features = window_features.transpose(1, 2).reshape(num_tokens, channels, side, side)
        points = torch.tanh(self.sampling_offsets(queries_in)).view(num_tokens, 1, -1, 2)
        sampled = F.grid_sample(
            grid_features, points.to(grid_features.dtype), padding_mode="border", align_corners=False
        )
        return sampled.squeeze(2).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, context: RememberContext) -> torch.Tensor:
        queries_in = self.norm(hidden_states.flatten(0, 1).index_select(0, context.layout.token_index))
        queries = self.query_out(self.act(self.query_up(queries_in)))
        num_tokens = queries.shape[0]
        queries = queries.view(num_tokens, self.num_heads, self.head_dim)
        if context.feature_statistics is not None:
            norms, scale = context.vision_remember.feature_norms, self.attention.scaling
            layout = context.feature_statistics, context.window_index, context.window_mask
            output = windowed_cross_attention(queries, context.features, norms, *layout, scale)
        elif self.interaction == "global":
            features = context.image_features.view(-1, self.num_heads, self.head_dim)
            per_image = context.tokens_per_image, context.features_per_image, context.image_lengths
            output = attend_images(self.attention, queries, features, *per_image)
        else:
            keys, window_mask = context.window_features, context.window_mask
            if self.interaction == "deformable":
                keys, window_mask = self.sample_points(queries_in, keys), None
            keys = keys.view(num_tokens, -1, self.num_heads, self.head_dim)
            output = attend_windows(self.attention, queries, keys, window_mask)
        update = context.weigh(self.out_proj(output.reshape(num_tokens, -1)) * context.windowed)
        return add_to_tokens(hidden_states, context.layout, update)


def add_to_tokens(hidden_states: torch.Tensor, layout: TokenLayout, update: torch.Tensor) -> torch.Tensor:
    """A residual sub-layer's output: `hidden_states` with `update` `(N, D)` added to its vision tokens."""
    flat = hidden_states.flatten(0, 1).index_add(0, layout.token_index, update.to(hidden_states.dtype))
    return flat.view_as(hidden_states)


class TokenBidirectionalSelfAttention(nn.Module):
    """Full self-attention over the vision tokens of a sample, plus a text-guided token; with several turns, each
    turn's tokens attend to those of its sample's turns up to its own, and to its own text-guided token."""

    def __init__(self, config: VisionRememberSettings):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.num_heads = config.self_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.text_guidance = config.text_guidance
        self.norm = nn.RMSNorm(hidden_size, eps=config.text_config.rms_norm_eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # a key bias cannot change a softmax
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = OutputProjection(hidden_size, hidden_size)
        self.attention = AttentionSettings(config, self.head_dim)

    def text_guided_tokens(self, hidden_states: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Adaptive max-pool over each row's prompt text: `(rows, D)`, zero where a row has none."""
        states = hidden_states.index_select(0, layout.guidance_rows)
        pooled = states.masked_fill(layout.unguided, torch.finfo(states.dtype).min).amax(dim=1)
        return torch.where(layout.has_guidance, pooled, 0.0)

    def heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(len(states), self.num_heads, self.head_dim)

    def attend_padded(self, queries, keys, values, layout: TokenLayout) -> torch.Tensor:
        """Rows padded to the longest: `(tokens, heads, head_dim)`."""
        queries = queries.index_select(0, layout.query_index.flatten()).unflatten(0, layout.query_index.shape)
        keys, values = (
            states.index_select(0, layout.key_index.flatten()).unflatten(0, layout.key_index.shape)
            for states in (keys, values)
        )
        queries, keys, values = (states.transpose(1, 2) for states in (queries, keys, values))
        output = attend(self.attention, queries, keys, values, layout.key_mask)
        return output.flatten(0, 1).index_select(0, layout.token_slot)

    def forward(self, hidden_states: torch.Tensor, context: RememberContext) -> torch.Tensor:
        layout = context.layout
        states = hidden_states.flatten(0, 1).index_select(0, layout.token_index)
        num_tokens = len(states)
        if self.text_guidance:
            states = torch.cat([states, self.text_guided_tokens(hidden_states, layout)])
        states = self.norm(states)
        queries = self.heads(self.q_proj(states[:num_tokens]))
        keys, values = self.heads(self.k_proj(states)), self.heads(self.v_proj(states))
        if "flash" in backend(self.attention, states):  # packed: nothing spent on padding
            keys, values = (tensor.index_select(0, layout.packed_key_index) for tensor in (keys, values))
            lengths = layout.query_lengths, layout.key_lengths, layout.max_query_length, layout.max_key_length
            output = attend_varlen(self.attention, queries, keys, values, *lengths)
        else:
            output = self.attend_padded(queries, keys, values, layout)
        return add_to_tokens(hidden_states, layout, context.weigh(self.out_proj(output.flatten(1))))


class VisionRememberLayer(nn.Module):
    """The two residual sub-layers that run after one decoder layer.

    A block of `VisionRemember` is built as `block(config, position)`, `position` its place among the blocks, and
    says what its context must hold: whether it reads the text-guided token (`text_guided(config)`), and whether its
    windowed cross-attention can run as the Triton kernel (`runs_kernel`), which reads raw features in place of
    gathered windows."""

    runs_kernel = True

    def __init__(self, config: VisionRememberSettings, position: int = 0):
        super().__init__()
        self.cross_attention = TokenFeatureCrossAttention(config)
        self.self_attention = TokenBidirectionalSelfAttention(config) if config.bidirectional else None

    def forward(self, hidden_states: torch.Tensor, context: RememberContext) -> torch.Tensor:
        hidden_states = self.cross_attention(hidden_states, context)
        if self.self_attention is not None:
            hidden_states = self.self_attention(hidden_states, context)
        return hidden_states

    @staticmethod
    def text_guided(config: VisionRememberSettings) -> bool:
        return config.text_guidance and config.bidirectional


class VisionRemember(nn.Module):
    """All Vision Remember blocks of a model, keyed by the decoder layer they follow, and the LayerNorm of each
    feature level that they share. The blocks are `VisionRememberLayer`s, or another block that reads the same context
    (the re-fusion methods LLaVA-VR compares with: `deepstack`, `spatial_vision_aggregator`)."""

    def __init__(self, config: VisionRememberSettings, block: type[nn.Module] = VisionRememberLayer):
        super().__init__()
        self.config = config
        self.text_guidance = block.text_guided(config)
        self.runs_kernel = block.runs_kernel
        num_levels = len(config.remember_feature_layers)
        self.feature_norms = nn.ModuleList(nn.LayerNorm(config.vision_config.hidden_size) for _ in range(num_levels))
        self.layers = nn.ModuleDict(
            {str(index): block(config, position) for position, index in enumerate(config.remember_after_layers)}
        )

    @contextmanager
    def own_random_stream(self, device: torch.device):
        """Draw the random numbers of the block from a stream of the blocks' own, started from the global stream the
        first time, and leave the global stream as it was: a model with Vision Remember and one without it, built from
        the same seed, share every other weight."""
        device = torch.device(device)
        get_state, set_state = rng_state_accessors(device)
        with fork_rng_on(device):
            streams = self.__dict__.setdefault("_init_rng_states", {})
            if str(device) in streams:
                set_state(streams[str(device)])
            yield
            streams[str(device)] = get_state()

    def attach(self, decoder_layers: nn.ModuleList):
        """Register the forward hooks that run each block after its decoder layer."""
        for index in self.config.remember_after_layers:
            decoder_layers[index].register_forward_hook(partial(remember_after_layer, index), with_kwargs=True)

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        norms = self.feature_norms
        return normalize_levels(features, [norm.weight for norm in norms], [norm.bias for norm in norms], norms[0].eps)

    def gather_windows(self, features: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """`(tokens, window, L * Dv)`: each window's normalised features (`window_index` without holes)."""
        gathered = features.index_select(0, window_index.flatten())
        return self.normalize_features(gathered).view(*window_index.shape, -1)

    def prepare(
        self,
        layout: TokenLayout,
        features: list[torch.Tensor],
        windows: list[torch.Tensor],
        stand_in: torch.Tensor | None = None,
    ) -> RememberContext:
        """The per-forward context, for every block: per image, its multi-level features `(rows, L * Dv)` and, on the
        host, each of its tokens' window of them `(tokens, window)`, -1 where none. Features are normalised once, in
        the blocks' dtype: each window's for `local` and `deformable` interaction, each image's for `global`.

        Tokens without any feature (AnyRes newlines) keep their row and have their update dropped: no shape depends
        on which tokens have windows.
        """
        feature_counts = [len(image) for image in features]
        features = torch.cat(features).to(self.feature_norms[0].weight.dtype)
        window_index = concat_windows(windows, feature_counts)
        window_mask = window_index >= 0
        windowed = window_mask.any(dim=1)
        tokens_per_image = [len(window) for window in windows]
        on_host = {"windowed": windowed[:, None].to(features.dtype)}
        if self.config.interaction == "global":  # global attention reads whole images, not windows
            on_host["token_lengths"] = torch.tensor(tokens_per_image, dtype=torch.int32)
            on_host["feature_lengths"] = torch.tensor(feature_counts, dtype=torch.int32)
        else:
            window_mask[:, 0] |= ~windowed  # a row with nothing to attend to would give NaN
            on_host["window_index"] = window_index.clamp(min=0)  # holes read feature row 0, and are masked out
            on_host["window_mask"] = window_mask
        on_device = to_device(on_host, features.device)
        context = RememberContext(
            vision_remember=self, layout=layout, windowed=on_device["windowed"], stand_in=stand_in
        )
        fused = self.runs_kernel and runs_triton_windows(self.config, features)
        if self.config.interaction == "global":
            context.image_features = self.normalize_features(features)
            context.tokens_per_image, context.features_per_image = tokens_per_image, feature_counts
            context.image_lengths = on_device["token_lengths"], on_device["feature_lengths"]
        elif fused:
            context.window_mask, context.window_index = on_device["window_mask"], on_device["window_index"]
            context.features, levels = features, len(self.feature_norms)
            context.feature_statistics = feature_statistics(features, levels, self.feature_norms[0].eps)
        else:
            context.window_mask = on_device["window_mask"]
            context.window_features = self.gather_windows(features, on_device["window_index"])
        return context
