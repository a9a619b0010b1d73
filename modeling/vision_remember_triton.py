"""The windowed token-feature cross-attention as one Triton kernel, for `attn_implementation="vision_remember_triton"`.

One program per (vision token, head) gathers the token's window of raw multi-level features, normalises each feature
with its level's LayerNorm (from statistics computed once per forward), scores the window against the token's query,
and takes the masked softmax and the weighted sum, in float32: each window is read once, and neither the gathered nor
the normalised windows are ever written. The backward recomputes the reference (gather, LayerNorm, SDPA) and
differentiates it, so training holds no gathered windows between forward and backward either.

Triton runs the kernel on CUDA tensors, and on CPU tensors under `TRITON_INTERPRET=1` (how the tests run it without a
GPU). Triton is optional: without it the blocks fall back to SDPA and say why.
"""

import os

import torch
from transformers.utils import logging

from .configuration_vision_remember_settings import TRITON_WINDOWS
from .vision_remember_attention import normalize_levels, sdpa_windows


try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


logger = logging.get_logger(__name__)


def triton_problems(tensor: torch.Tensor) -> list[str]:
    """Why the kernel cannot run on tensors like `tensor`; empty when it can."""
    if triton is None:
        return ["Triton is not installed (pip install triton)"]
    if tensor.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return [f"it runs on CUDA devices (or CPU tensors under TRITON_INTERPRET=1), not {tensor.device.type}"]
    return []


def runs_triton_windows(config, tensor: torch.Tensor) -> bool:
    """Whether the windowed cross-attention runs as the kernel on tensors like `tensor`: asked for through
    `attn_implementation`, for `local` interaction, and Triton able to run it; where it was asked for and cannot run,
    a warning says why (once) and SDPA runs instead."""
    if config._attn_implementation != TRITON_WINDOWS:
        return False
    problems = triton_problems(tensor)
    if config.interaction != "local":
        problems.append(f"interaction={config.interaction!r} has no fixed windows of features (only 'local' has)")
    if problems:
        logger.warning_once(f"The Triton kernel cannot run ({'; '.join(problems)}): Vision Remember runs on SDPA.")
    return not problems


def feature_statistics(features: torch.Tensor, num_levels: int, eps: float) -> torch.Tensor:
    """Each feature row's mean and reciprocal standard deviation per level, as its LayerNorm computes them:
    `(rows, levels, 2)` float32."""
    levels = features.float().unflatten(-1, (num_levels, -1))
    variance, mean = torch.var_mean(levels, dim=-1, unbiased=False)
    return torch.stack([mean, torch.rsqrt(variance + eps)], dim=-1)


if triton is not None:

    @triton.jit
    def _windowed_attention_kernel(
        query,
        features,
        statistics,
        window_index,
        window_mask,
        weight,
        bias,
        output,
        window_width,
        head_dim,
        level_size,
        num_levels,
        query_token_stride,
        feature_row_stride,
        scale,
        WINDOW: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_IN_ONE_LEVEL: tl.constexpr,
    ):
        token, head = tl.program_id(0), tl.program_id(1)
        slots, dims = tl.arange(0, WINDOW), tl.arange(0, HEAD_DIM)
        in_window, in_head = slots < window_width, dims < head_dim
        rows = tl.load(window_index + token * window_width + slots, mask=in_window, other=0).to(tl.int64)
        present = tl.load(window_mask + token * window_width + slots, mask=in_window, other=0) != 0
        channels = head * head_dim + dims
        read = present[:, None] & in_head[None, :]
        if HEAD_IN_ONE_LEVEL:  # one statistic per window row, not per element
            row_statistics = statistics + (rows * num_levels + head * head_dim // level_size)[:, None] * 2
        else:
            row_statistics = statistics + (rows[:, None] * num_levels + (channels // level_size)[None, :]) * 2
        mean = tl.load(row_statistics, mask=read, other=0.0)
        inverse_std = tl.load(row_statistics + 1, mask=read, other=0.0)
        raw = tl.load(features + rows[:, None] * feature_row_stride + channels[None, :], mask=read, other=0.0)
        scale_by = tl.load(weight + channels, mask=in_head, other=0.0).to(tl.float32)
        shift_by = tl.load(bias + channels, mask=in_head, other=0.0).to(tl.float32)
        keys = (raw.to(tl.float32) - mean) * inverse_std * scale_by[None, :] + shift_by[None, :]
        keys = tl.where(read, keys, 0.0)
        token_query = query + token * query_token_stride + head * head_dim + dims
        token_query = tl.load(token_query, mask=in_head, other=0.0).to(tl.float32)
        scores = tl.sum(keys * token_query[None, :], axis=1) * scale
        scores = tl.where(present, scores, float("-inf"))
        probabilities = tl.exp(scores - tl.max(scores, axis=0))
        probabilities = probabilities / tl.sum(probabilities, axis=0)
        attended = tl.sum(probabilities[:, None] * keys, axis=0)
        target = output + token * query_token_stride + head * head_dim + dims
        tl.store(target, attended.to(output.dtype.element_ty), mask=in_head)


def launch(query, features, weight, bias, statistics, window_index, window_mask, level_size: int, scale: float):
    """The kernel over every (token, head): `query` `(tokens, heads, head_dim)`, `features` `(rows, L * Dv)`, `weight`
    and `bias` the levels' LayerNorm parameters concatenated `(L * Dv,)`, `statistics` from `feature_statistics`,
    `window_index` `(tokens, window)` rows of `features` and `window_mask` True where present (at least one per
    token). Returns `(tokens, heads, head_dim)`."""
    num_tokens, num_heads, head_dim = query.shape
    query, features = query.contiguous(), features.contiguous()
    window_index, window_mask = window_index.contiguous(), window_mask.contiguous()
    output = torch.empty_like(query)
    _windowed_attention_kernel[(num_tokens, num_heads)](
        query,
        features,
        statistics.contiguous(),
        window_index,
        window_mask,
        weight.contiguous(),
        bias.contiguous(),
        output,
        window_index.shape[1],
        head_dim,
        level_size,
        statistics.shape[1],
        num_heads * head_dim,
        features.shape[1],
        scale,
        WINDOW=max(triton.next_power_of_2(window_index.shape[1]), 2),
        HEAD_DIM=max(triton.next_power_of_2(head_dim), 16),
        HEAD_IN_ONE_LEVEL=level_size % head_dim == 0,
    )
    return output


def reference(query, features, weight, bias, window_index, window_mask, level_size: int, eps: float, scale: float):
    """What the kernel computes, in torch: gather, LayerNorm per level, SDPA."""
    windows = features.index_select(0, window_index.flatten()).unflatten(0, window_index.shape)
    keys = normalize_levels(windows, weight.split(level_size), bias.split(level_size), eps)
    return sdpa_windows(query, keys.unflatten(-1, query.shape[1:]), window_mask, scale)


class WindowedCrossAttention(torch.autograd.Function):
    """The kernel forward; the reference recomputed and differentiated backward."""

    @staticmethod
    def forward(ctx, query, features, weight, bias, statistics, window_index, window_mask, level_size, eps, scale):
        ctx.save_for_backward(query, features, weight, bias, window_index, window_mask)
        ctx.settings = level_size, eps, scale
        return launch(query, features, weight, bias, statistics, window_index, window_mask, level_size, scale)

    @staticmethod
    def backward(ctx, grad_output):
        *differentiable, window_index, window_mask = ctx.saved_tensors
        needed = ctx.needs_input_grad
        inputs = [tensor.detach().requires_grad_(grad) for tensor, grad in zip(differentiable, needed)]
        with torch.enable_grad():
            output = reference(*inputs, window_index, window_mask, *ctx.settings)
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        grads = iter(torch.autograd.grad(output, wanted, grad_output))
        return (*(next(grads) if tensor.requires_grad else None for tensor in inputs), *(None,) * 6)


def windowed_cross_attention(query, features, norms, statistics, window_index, window_mask, scale: float):
    """Each token's query against its window of `features`, normalised by `norms` (one LayerNorm per level), in one
    kernel. `query` `(tokens, heads, head_dim)`; returns the same shape."""
    weight = torch.cat([norm.weight for norm in norms])
    bias = torch.cat([norm.bias for norm in norms])
    settings = norms[0].normalized_shape[0], norms[0].eps, scale
    return WindowedCrossAttention.apply(
        query, features, weight, bias, statistics, window_index, window_mask, *settings
    )
