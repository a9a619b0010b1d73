"""Efficient projectors: `(views, g*g, Dv)` vision features to `(views, n*n, Dt)` tokens, `n = g / s`, row-major.

Pooling, PixelShuffle, LDPv2 and TokenPacker token `(i, j)` summarises the `s x s` patch window
`[i*s:(i+1)*s, j*s:(j+1)*s]` by construction; TokenPacker reads the multi-level features, `(views, g*g, L * Dv)`.
The Perceiver resampler's `n*n` tokens are learned queries, each attending to every patch of the view: none has a
window of its own, so Vision Remember gives them the whole image (`interaction="global"`).
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .configuration_llava_vr import VisionRememberConfig
from .vision_remember import AttentionSettings, attend, block_windows
from .vision_remember_attention import attend_windows


class ProjectorMLP(nn.Module):
    def __init__(self, config: VisionRememberConfig, input_size: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(input_size, hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


def to_grid(features: torch.Tensor) -> torch.Tensor:
    """`(views, g*g, C)` to `(views, C, g, g)`."""
    side = int(features.shape[1] ** 0.5)
    return features.transpose(1, 2).unflatten(2, (side, side))


def from_grid(grid: torch.Tensor) -> torch.Tensor:
    """`(views, C, n, n)` to `(views, n*n, C)`."""
    return grid.flatten(2).transpose(1, 2)


class AvgPoolProjector(nn.Module):
    """Average-pool each `s x s` window, then an MLP."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        self.stride = config.downsample_factor
        self.mlp = ProjectorMLP(config, config.vision_config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(to_grid(features), self.stride)
        return self.mlp(from_grid(pooled))


class PixelShuffleProjector(nn.Module):
    """Stack each `s x s` window on the channels (space-to-depth), then LayerNorm and an MLP."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        self.stride = config.downsample_factor
        stacked_size = config.vision_config.hidden_size * self.stride**2
        self.norm = nn.LayerNorm(stacked_size)
        self.mlp = ProjectorMLP(config, stacked_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stacked = F.pixel_unshuffle(to_grid(features), self.stride)
        return self.mlp(self.norm(from_grid(stacked)))


class LDPv2Projector(nn.Module):
    """MobileVLM V2's LDPv2: MLP, `s x s` average pooling, then a depthwise-convolution positional encoding."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.stride = config.downsample_factor
        self.mlp = ProjectorMLP(config, config.vision_config.hidden_size)
        self.peg = nn.Conv2d(hidden_size, hidden_size, kernel_size=3, padding=1, groups=hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(to_grid(self.mlp(features)), self.stride)
        return from_grid(pooled + self.peg(pooled))


class PerceiverLayer(nn.Module):
    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.num_heads = config.self_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.query_norm = nn.LayerNorm(hidden_size)
        self.feature_norm = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)  # a key bias cannot change a softmax
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = ProjectorMLP(config, hidden_size)
        self.attention = AttentionSettings(config, self.head_dim)

    def split_heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        queries_in = self.query_norm(latents)
        keys_in = torch.cat([self.feature_norm(features), queries_in], dim=1)
        queries = self.split_heads(self.q_proj(queries_in))
        keys, values = self.split_heads(self.k_proj(keys_in)), self.split_heads(self.v_proj(keys_in))
        output = attend(self.attention, queries, keys, values)
        latents = latents + self.o_proj(output.flatten(2))
        return latents + self.mlp(self.mlp_norm(latents))


class PerceiverProjector(nn.Module):
    """Perceiver resampler: `n*n` learned queries cross-attend to the features (and themselves)."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.latents = nn.Parameter(torch.zeros(config.tokens_per_side**2, hidden_size))
        self.input_proj = nn.Linear(config.vision_config.hidden_size, hidden_size)
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.perceiver_num_layers))
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = self.input_proj(features)
        latents = self.latents[None].expand(features.shape[0], -1, -1).to(features.dtype)
        for layer in self.layers:
            latents = layer(latents, features)
        return self.norm(latents)


class TokenPackerProjector(nn.Module):
    """TokenPacker's point-to-region projector: each token's point query is the last level's features bilinearly
    downsampled to the token grid; it cross-attends to its `s x s` region of the multi-level features (projected to
    keys and values, with the tower's heads), adds the result to itself, and an MLP takes it to the decoder."""

    def __init__(self, config: VisionRememberConfig):
        super().__init__()
        vision_size, levels = config.vision_config.hidden_size, len(config.vision_feature_layers)
        self.stride = config.downsample_factor
        self.num_heads = config.vision_config.num_attention_heads
        self.head_dim = vision_size // self.num_heads
        self.q_proj = nn.Linear(vision_size, vision_size)
        self.k_proj = nn.Linear(levels * vision_size, vision_size)
        self.v_proj = nn.Linear(levels * vision_size, vision_size)
        self.q_norm, self.k_norm, self.v_norm = (nn.LayerNorm(vision_size) for _ in range(3))
        self.o_proj = nn.Linear(vision_size, vision_size)
        self.mlp = ProjectorMLP(config, vision_size)
        self.attention = AttentionSettings(config, self.head_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        views, patches, channels = features.shape
        side = int(patches**0.5)
        last_level = features[..., channels - self.q_proj.in_features :]
        points = F.interpolate(to_grid(last_level), scale_factor=1 / self.stride, mode="bilinear")
        points = from_grid(points).flatten(0, 1)  # (tokens, Dv), view after view
        regions = features[:, block_windows(side, side, self.stride).to(features.device)].flatten(0, 1)
        heads = (self.num_heads, self.head_dim)
        queries = self.q_norm(self.q_proj(points)).unflatten(-1, heads)
        keys = self.k_norm(self.k_proj(regions)).unflatten(-1, heads)
        values = self.v_norm(self.v_proj(regions)).unflatten(-1, heads)
        output = attend_windows(self.attention, queries, keys, values=values)
        packed = points + self.o_proj(output.flatten(1))
        return self.mlp(packed).unflatten(0, (views, -1))


PROJECTORS = {
    "avg_pool": AvgPoolProjector,
    "pixel_shuffle": PixelShuffleProjector,
    "perceiver": PerceiverProjector,
    "ldpv2": LDPv2Projector,
    "tokenpacker": TokenPackerProjector,
}


def build_projector(config: VisionRememberConfig) -> nn.Module:
    return PROJECTORS[config.projector_type](config)
