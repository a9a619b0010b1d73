"""FastV (Chen et al., 2024), the token-pruning rival LLaVA-VR compares Vision Remember with (`fastv_layer`).

The decoder layers before `fastv_layer` see every vision token. The last of them ranks each turn's vision tokens by
how much attention the last token of the turn's prompt pays them, averaged over the heads; from `fastv_layer` on,
only the `fastv_keep_ratio` most attended of them remain visible. The ranking recomputes that one query row from the
layer's own projections, so no attention map is materialised; the pruned tokens are masked out of the attention of
every later layer, which is what dropping them does to every other token, and the cache keeps the pruned set for the
decoding steps that follow.
"""

import math

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


# The pruned positions of a cache's prompt, set by the forward that ranked them, read by every decoding step after it
PRUNED_ATTRIBUTE = "vision_remember_fastv_pruned"
MASKING_IMPLEMENTATIONS = ("eager", "sdpa")


class FastVContext:
    """What one forward with images needs: per (sample, turn) group of vision tokens, the position of the query that
    ranks them, the keys it sees and how many of them stay; after the ranking layer, the pruned positions."""

    def __init__(self, samples: list[int], queries: list[int], visible_keys, groups, keep, device: torch.device):
        self.samples = samples  # per group, its sample
        self.sample_index, self.queries = (torch.tensor(values, device=device) for values in (samples, queries))
        self.visible_keys = visible_keys.to(device)  # `(groups, sequence)`
        self.groups, self.keep = groups, keep  # per group: its vision tokens' positions, how many stay
        self.pruned = None  # `(batch, sequence)`, set by the ranking layer

    @classmethod
    def from_turns(cls, turns, keep_ratio: float, device: torch.device) -> "FastVContext":
        """Each turn's vision tokens are ranked by the last text token of the turn's prompt (the last before its
        answer or generation), which sees no answer and no later turn: in training as in generation."""
        placeholders, turn_of, readable = turns.placeholders, turns.turns, turns.pooled | turns.placeholders
        token_samples, token_positions = placeholders.nonzero(as_tuple=True)
        token_groups = torch.stack([token_samples, turn_of[token_samples, token_positions]], dim=1)
        samples, queries, visible_keys, groups, keep = [], [], [], [], []
        for sample, turn in torch.unique(token_groups, dim=0).tolist():
            in_turn = turn_of[sample] == turn
            tokens = (placeholders[sample] & in_turn).nonzero()[:, 0]
            text = (turns.pooled[sample] & in_turn).nonzero()[:, 0]
            query = int(text[-1] if len(text) else tokens[-1])
            samples.append(sample)
            queries.append(query)
            visible_keys.append(readable[sample] & (torch.arange(len(in_turn)) <= query))
            groups.append(tokens.to(device))
            keep.append(max(1, round(keep_ratio * len(tokens))))
        return cls(samples, queries, torch.stack(visible_keys), groups, keep, device)

    @torch.no_grad()  # the choice is not differentiable: nothing of it needs a gradient
    def rank(self, attention: nn.Module, hidden_states: torch.Tensor, position_embeddings) -> torch.Tensor:
        """`(batch, sequence)`: the vision tokens the groups' queries attend to least, from the attention module's
        own query and key projections of its input and its rotary position embedding."""
        samples, queries = self.sample_index, self.queries
        rows = samples if len(position_embeddings[0]) > 1 else torch.zeros_like(samples)
        cos, sin = (table[rows] for table in position_embeddings)  # `(groups, sequence, head_dim)`
        groups = torch.arange(len(samples), device=samples.device)
        query = project(attention, "q", hidden_states[samples, queries])
        query = rotate(query, cos[groups, queries], sin[groups, queries])
        keys = rotate(project(attention, "k", hidden_states[samples]), cos, sin)
        keys = keys.repeat_interleave(query.shape[-2] // keys.shape[-2], dim=-2)
        scores = torch.einsum("ghd,gkhd->ghk", query.float(), keys.float()) * attention.scaling
        weights = scores.masked_fill(~self.visible_keys[:, None], -math.inf).softmax(dim=-1).mean(dim=1)
        pruned = torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        for group, (sample, tokens, keep) in enumerate(zip(self.samples, self.groups, self.keep)):
            pruned[sample, tokens] = True
            pruned[sample, tokens[weights[group, tokens].topk(keep).indices]] = False
        return pruned


def project(attention: nn.Module, name: str, states: torch.Tensor) -> torch.Tensor:
    """`(..., heads, head_dim)`: the attention's query or key projection of `states`, through its per-head norm
    where it has one (Qwen3)."""
    projected = getattr(attention, f"{name}_proj")(states).unflatten(-1, (-1, attention.head_dim))
    norm = getattr(attention, f"{name}_norm", None)
    return norm(projected) if norm is not None else projected


def rotate(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary position embedding of `states` `(..., heads, head_dim)`, `cos` and `sin` `(..., head_dim)`."""
    return states * cos[..., None, :] + rotate_half(states) * sin[..., None, :]


def causal_mask(query_length: int, cache, layer_index: int, prefill: bool, device: torch.device) -> torch.Tensor:
    """The bool mask a layer's `None` mask stands for: causal, over the keys the layer's attention gets (a static
    cache's whole length, unfilled slots included). Only the forward that starts the sequence (`prefill`) and a
    decoding step on a dynamic cache get `None`."""
    key_length = cache.get_mask_sizes(query_length, layer_index)[0] if cache is not None else query_length
    start = 0 if prefill else key_length - query_length
    queries = torch.arange(start, start + query_length, device=device)
    return (torch.arange(key_length, device=device) <= queries[:, None])[None, None]


def mask_pruned(attention_mask: torch.Tensor, pruned: torch.Tensor, prefill: bool) -> torch.Tensor:
    """A layer's bool or additive 4-D mask, with the `pruned` keys `(batch, prompt)` masked out for every query. In
    the forward that pruned them (`prefill`, which starts the sequence), a pruned token still sees itself: nothing
    reads it, and a query that sees no key gives NaN."""
    queries, keys = attention_mask.shape[-2:]
    visible = ~nn.functional.pad(pruned, (0, keys - pruned.shape[-1]))[:, None, None]
    if prefill:
        visible = visible | torch.eye(queries, keys, dtype=torch.bool, device=pruned.device)
    if attention_mask.dtype == torch.bool:
        return attention_mask & visible
    return attention_mask.masked_fill(~visible, torch.finfo(attention_mask.dtype).min)


class FastV:
    """FastV's hooks on a decoder's attention modules: the ranking before the attention of layer `fastv_layer - 1`,
    the pruned tokens' masking before the attention of every layer from `fastv_layer` on. Holds no weights."""

    def __init__(self, config):
        self.layer, self.keep_ratio = config.fastv_layer, config.fastv_keep_ratio

    def attach(self, decoder_layers: nn.ModuleList):
        decoder_layers[self.layer - 1].self_attn.register_forward_pre_hook(self.rank, with_kwargs=True)
        for layer in decoder_layers[self.layer :]:
            layer.self_attn.register_forward_pre_hook(self.mask, with_kwargs=True)

    def prepare(self, turns, device: torch.device, attention_implementation: str) -> FastVContext:
        """The context of a forward with images (`turns`: its `PromptTurns`)."""
        if attention_implementation not in MASKING_IMPLEMENTATIONS:
            raise ValueError(
                f"FastV masks the vision tokens it prunes out of a 4-D attention mask, which attn_implementation="
                f"{attention_implementation!r} does not take: load the model with attn_implementation='sdpa' (or "
                "'eager')."
            )
        return FastVContext.from_turns(turns, self.keep_ratio, device)

    @staticmethod
    def rank(attention, args, kwargs):
        context = kwargs.get("fastv")
        if context is not None:
            context.pruned = context.rank(attention, kwargs["hidden_states"], kwargs["position_embeddings"])
            cache = layer_cache(kwargs)
            if cache is not None:
                setattr(cache, PRUNED_ATTRIBUTE, context.pruned)
        return None

    @staticmethod
    def mask(attention, args, kwargs):
        context, cache = kwargs.get("fastv"), layer_cache(kwargs)
        pruned = context.pruned if context is not None else getattr(cache, PRUNED_ATTRIBUTE, None)
        if pruned is None:
            return None
        attention_mask, prefill = kwargs["attention_mask"], context is not None
        if attention_mask is None:
            query_length, device = kwargs["hidden_states"].shape[1], pruned.device
            attention_mask = causal_mask(query_length, cache, attention.layer_idx, prefill, device)
        return args, {**kwargs, "attention_mask": mask_pruned(attention_mask, pruned, prefill)}


def layer_cache(kwargs: dict):
    """The cache a decoder layer's attention gets: `cache` from Transformers 5.24 on, `past_key_values` before."""
    return kwargs.get("cache", kwargs.get("past_key_values"))
