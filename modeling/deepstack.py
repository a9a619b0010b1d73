"""DeepStack, as Transformers' Qwen3-VL runs it, as a re-fusion block of LLaVA-VR (`refusion="deepstack"`).

Qwen3-VL merges the features of a few vision encoder layers to the token grid, each level through a merger of its
own (a token's window of patches stacked on the channels, LayerNorm, then an MLP), and adds level `i` to the vision
tokens' hidden states after decoder layer `i`. Here the levels are the multi-level features Vision Remember reads
(`vision_feature_layers`), each patch through its level's shared LayerNorm before the window is stacked, and they are
spread over the blocks (`remember_after_layers`) in equal consecutive shares: as many blocks as levels is Qwen3-VL's
one level per layer. Each merger's last projection starts at zero (`identity_init`), as Vision Remember's do.
"""

import torch
from torch import nn
from transformers.activations import ACT2FN

from .vision_remember import OutputProjection, RememberContext, add_to_tokens


class DeepStackMerger(nn.Module):
    """A token's window of one level's features, stacked on the channels, to one decoder-width vector."""

    def __init__(self, config, stacked_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(stacked_size)
        self.linear_fc1 = nn.Linear(stacked_size, stacked_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_fc2 = OutputProjection(stacked_size, config.text_config.hidden_size)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(self.norm(stacked))))


class DeepStackLayer(nn.Module):
    """The levels of one block's share, each merged and added to the vision tokens."""

    runs_kernel = False

    def __init__(self, config, position: int):
        super().__init__()
        share = len(config.remember_feature_layers) // len(config.remember_after_layers)
        self.levels = list(range(position * share, (position + 1) * share))
        self.num_levels = len(config.remember_feature_layers)
        stacked_size = config.downsample_factor**2 * config.vision_config.hidden_size
        self.mergers = nn.ModuleList(DeepStackMerger(config, stacked_size) for _ in self.levels)

    @staticmethod
    def text_guided(config) -> bool:
        return False

    def forward(self, hidden_states: torch.Tensor, context: RememberContext) -> torch.Tensor:
        # LLaVA-VR's windows are whole; a newline token has none (it reads row 0) and its update is dropped
        levels = context.window_features.unflatten(-1, (self.num_levels, -1))  # (tokens, window, levels, Dv)
        update = sum(merger(levels[:, :, level].flatten(1)) for level, merger in zip(self.levels, self.mergers))
        return add_to_tokens(hidden_states, context.layout, context.weigh(update * context.windowed))
