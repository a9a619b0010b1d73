"""Cambrian-1's Spatial Vision Aggregator inside the decoder, as a re-fusion block of LLaVA-VR (`refusion="sva"`).

Cambrian-1 inserts its aggregator between decoder layers: each vision token's hidden state is a query that
cross-attends to the region of every vision feature map it covers, each map projected to keys and values by
projections of its own, all maps' regions in one softmax. Here the maps are the levels of the multi-level features
Vision Remember reads (each patch through its level's shared LayerNorm), the region a token's window, and the
attention runs at the decoder's width with `self_attention_heads` heads. What sets Vision Remember apart is left out:
features as keys and values without projections, queries expanded to the feature width, the bidirectional
self-attention and the text-guided token.
"""

import torch
from torch import nn

from .vision_remember import OutputProjection, RememberContext, add_to_tokens
from .vision_remember_attention import AttentionSettings, attend_windows


class SpatialVisionAggregator(nn.Module):
    """One residual cross-attention from the vision tokens to their windows of every feature level."""

    runs_kernel = False

    def __init__(self, config, position: int = 0):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.num_heads = config.self_attention_heads
        self.head_dim = hidden_size // self.num_heads
        self.norm = nn.RMSNorm(hidden_size, eps=config.text_config.rms_norm_eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        levels = len(config.remember_feature_layers)
        self.k_proj = nn.ModuleList(nn.Linear(config.vision_config.hidden_size, hidden_size) for _ in range(levels))
        self.v_proj = nn.ModuleList(nn.Linear(config.vision_config.hidden_size, hidden_size) for _ in range(levels))
        self.out_proj = OutputProjection(hidden_size, hidden_size)
        self.attention = AttentionSettings(config, self.head_dim)

    @staticmethod
    def text_guided(config) -> bool:
        return False

    def forward(self, hidden_states: torch.Tensor, context: RememberContext) -> torch.Tensor:
        layout = context.layout
        queries = self.q_proj(self.norm(hidden_states.flatten(0, 1).index_select(0, layout.token_index)))
        num_tokens = len(queries)
        levels = context.window_features.unflatten(-1, (len(self.k_proj), -1)).unbind(2)  # each (tokens, window, Dv)
        keys = torch.cat([project(level) for project, level in zip(self.k_proj, levels)], dim=1)
        values = torch.cat([project(level) for project, level in zip(self.v_proj, levels)], dim=1)
        heads = (num_tokens, -1, self.num_heads, self.head_dim)
        # No mask: LLaVA-VR's windows are whole; a newline token has none (it reads row 0) and its update is dropped
        output = attend_windows(
            self.attention, queries.view(heads[0], *heads[2:]), keys.view(heads), None, values.view(heads)
        )
        update = self.out_proj(output.reshape(num_tokens, -1)) * context.windowed
        return add_to_tokens(hidden_states, layout, context.weigh(update))
