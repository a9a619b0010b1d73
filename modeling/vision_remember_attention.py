"""Attention for the Vision Remember blocks, through Transformers' attention interface, in the model's
`attn_implementation`:

- `eager`: the reference, Transformers' eager attention on padded layouts;
- `sdpa` (and any other non-flash implementation): the same layouts, with the windowed cross-attention (one query
  per token, `s*s` keys) as one call of `torch.nn.functional.scaled_dot_product_attention`, its fastest form measured
  by `benchmarks/benchmark.py`;
- `flash_attention_*`: FlashAttention's varlen kernels on packed tokens, without padding (window holes, samples with
  fewer vision tokens): the flash-attn package's through the interface where it is installed, else torch's own
  (`torch.nn.attention.varlen`). Where FlashAttention cannot run the inputs (not on CUDA, not half precision,
  head_dim above 256) the blocks fall back to SDPA and say why once;
- `vision_remember_triton`: SDPA everywhere (the name is registered with Transformers' attention and mask interfaces
  as SDPA's), except the `local` windowed cross-attention, which runs as one Triton kernel
  (`vision_remember_triton`) where Triton can run it, and falls back to SDPA, saying why once, where it cannot.
"""

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils import logging
from transformers.utils.import_utils import (
    is_flash_attn_2_available,
    is_flash_attn_3_available,
    is_flash_attn_4_available,
)

from .configuration_vision_remember_settings import FLASH_MAX_HEAD_DIM, TRITON_WINDOWS, VisionRememberSettings


try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.10
    varlen_attn = None


logger = logging.get_logger(__name__)

FLASH_PACKAGES = {
    "flash_attention_2": is_flash_attn_2_available,
    "flash_attention_3": is_flash_attn_3_available,
    "flash_attention_4": is_flash_attn_4_available,
}
# The rest of the model (decoder, vision tower) runs SDPA under the Triton kernel's name
AttentionInterface.register(TRITON_WINDOWS, sdpa_attention_forward)
AttentionMaskInterface.register(TRITON_WINDOWS, sdpa_mask)


class AttentionSettings(nn.Module):
    """Attributes the attention interface reads from its `module` argument."""

    is_causal = False
    num_key_value_groups = 1

    def __init__(self, config: VisionRememberSettings, head_dim: int):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        self.scaling = head_dim**-0.5


def flash_problems(module: nn.Module, tensor: torch.Tensor) -> list[str]:
    """Why FlashAttention cannot run `module`'s attention on inputs like `tensor`; empty when it can."""
    problems = []
    if tensor.device.type != "cuda":
        problems.append(f"it runs on CUDA devices only, not {tensor.device.type}")
    if tensor.dtype not in (torch.float16, torch.bfloat16):
        problems.append(f"it needs float16 or bfloat16, not {tensor.dtype}")
    if module.head_dim > FLASH_MAX_HEAD_DIM:
        problems.append(f"head_dim {module.head_dim} is above its limit of {FLASH_MAX_HEAD_DIM} (use more heads)")
    implementation = module.config._attn_implementation
    if implementation in FLASH_PACKAGES and not FLASH_PACKAGES[implementation]() and varlen_attn is None:
        problems.append("neither its package nor torch's own varlen kernels (torch.nn.attention.varlen) are here")
    return problems


def uses_torch_varlen(implementation: str) -> bool:
    """FlashAttention asked for without its package: torch's own varlen kernels (the same FlashAttention algorithm,
    shipped with torch) run the packed attention instead."""
    package = FLASH_PACKAGES.get(implementation)
    return package is not None and not package() and varlen_attn is not None


def backend(module: nn.Module, tensor: torch.Tensor) -> str:
    """The attention implementation for `module` on inputs like `tensor`: the model's, or SDPA where FlashAttention
    was asked for and cannot run them."""
    implementation = module.config._attn_implementation or "eager"
    if implementation == TRITON_WINDOWS:  # the kernel is chosen where the windows are prepared
        return "sdpa"
    if "flash" not in implementation:
        return implementation
    problems = flash_problems(module, tensor)
    if problems:
        logger.warning_once(
            f"{implementation} cannot run Vision Remember's attention ({'; '.join(problems)}): it falls back to sdpa."
        )
        return "sdpa"
    return implementation


def attend(module: nn.Module, query, key, value, key_mask=None, **kwargs):
    """Non-causal attention through Transformers' attention interface.

    `query`, `key`, `value`: `(batch, heads, length, head_dim)`; `key_mask`: `(batch, key_length)`, True to attend;
    `kwargs` reach the attention function (FlashAttention's `cu_seq_lens_q`, ... for packed sequences).
    Returns `(batch, query_length, heads, head_dim)`.
    """
    implementation = backend(module, query)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    mask = key_mask
    if key_mask is not None and "flash" not in implementation:
        mask = key_mask[:, None, None, :]  # SDPA takes it as it is; the others add it to the scores
        if implementation != "sdpa":
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~mask, torch.finfo(query.dtype).min
            )
    output, _ = attention(
        module, query, key, value, mask, scaling=module.scaling, dropout=0.0, is_causal=False, **kwargs
    )
    return output


def sequence_starts(lengths: torch.Tensor) -> torch.Tensor:
    """FlashAttention's `cu_seqlens`: `(len(lengths) + 1,)` int32 offsets of packed sequences."""
    return F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


def attend_varlen(module: nn.Module, query, key, value, query_lengths, key_lengths, max_query, max_key):
    """FlashAttention varlen over packed sequences: `query` `(total_q, heads, head_dim)`, `key` and `value`
    `(total_k, heads, head_dim)`. Returns `(total_q, heads, head_dim)`. The flash-attn package's kernels through
    Transformers' attention interface where installed, else torch's own."""
    starts = sequence_starts(query_lengths), sequence_starts(key_lengths)
    if uses_torch_varlen(module.config._attn_implementation):  # its default scale, head_dim**-0.5, is the blocks'
        return varlen_attn(query, key, value, *starts, max_query, max_key)
    query, key, value = (tensor[None].transpose(1, 2) for tensor in (query, key, value))
    output = attend(
        module,
        query,
        key,
        value,
        cu_seq_lens_q=starts[0],
        cu_seq_lens_k=starts[1],
        max_length_q=max_query,
        max_length_k=max_key,
    )
    return output[0]


def attend_windows(module: nn.Module, query, window, window_mask=None, values=None) -> torch.Tensor:
    """Each token's one query against its window: `window` holds the keys, and the values too unless `values` (of
    the same shape) are given.

    `query`: `(tokens, heads, head_dim)`; `window`: `(tokens, window, heads, head_dim)`; `window_mask`:
    `(tokens, window)`, True where there is a feature. Returns `(tokens, heads, head_dim)`.
    """
    implementation = backend(module, query)
    values = window if values is None else values
    num_tokens, width = window.shape[:2]
    if "flash" in implementation:
        if window_mask is None:
            keys, packed_values = window.flatten(0, 1), values.flatten(0, 1)
            key_lengths = window.new_full((num_tokens,), width, dtype=torch.int32)
        else:
            keys, packed_values = window[window_mask], values[window_mask]
            key_lengths = window_mask.sum(1, dtype=torch.int32)
        lengths = torch.ones_like(key_lengths), key_lengths, 1, width
        return attend_varlen(module, query, keys, packed_values, *lengths)
    if implementation == "eager":
        return attend(module, query[:, :, None], window.transpose(1, 2), values.transpose(1, 2), window_mask)[:, 0]
    return sdpa_windows(query, window, window_mask, module.scaling, values)


def sdpa_windows(query, window, window_mask, scale: float, values=None) -> torch.Tensor:
    """`attend_windows` as one SDPA call, its fastest form measured by `benchmarks/benchmark.py`."""
    keys = window.transpose(1, 2)
    values = keys if values is None else values.transpose(1, 2)
    mask = None if window_mask is None else window_mask[:, None, None, :]
    return F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=mask, scale=scale)[:, :, 0]


def normalize_levels(features: torch.Tensor, weights, biases, eps: float) -> torch.Tensor:
    """Multi-level features `(..., L * Dv)`, each level through its own LayerNorm (`weights[l]`, `biases[l]`): the
    cross-attention's keys."""
    levels = features.chunk(len(weights), dim=-1)
    normalized = [F.layer_norm(level, level.shape[-1:], w, b, eps) for level, w, b in zip(levels, weights, biases)]
    return torch.cat(normalized, dim=-1)


def attend_images(
    module: nn.Module, query, features, tokens_per_image: list[int], features_per_image: list[int], lengths: tuple
):
    """Each image's tokens' queries against all of that image's features, shared as keys and values (no per-token
    copies). `query`: `(tokens, heads, head_dim)`, image after image; `features`: `(features, heads, head_dim)`, image
    after image; `lengths`: the two counts as int32 tensors on the device, for FlashAttention. Returns `(tokens, heads,
    head_dim)`."""
    if "flash" in backend(module, query):
        longest = max(tokens_per_image), max(features_per_image)
        return attend_varlen(module, query, features, features, *lengths, *longest)
    queries = pad_sequence(query.split(tokens_per_image), batch_first=True).transpose(1, 2)
    keys = pad_sequence(features.split(features_per_image), batch_first=True).transpose(1, 2)
    present = [torch.ones(count, dtype=torch.bool, device=query.device) for count in features_per_image]
    output = attend(module, queries, keys, keys, pad_sequence(present, batch_first=True))
    return torch.cat([image[:count] for image, count in zip(output, tokens_per_image)])
