"""The token-feature cross-attention paths of Vision Remember on a model's own inputs, against the reference and the
floor: each path's keys (built once per forward, shared by the blocks) and its attention (once per block), as device
time (`measure.device_seconds`, inputs rotated beyond the cache).

Inputs are laid out as `VisionRemember.prepare` lays out the model's own images: every token of every AnyRes view,
the newline tokens without a window included, with the window mask the model runs with. Paths: `local` windows on the
reference (eager), SDPA, FlashAttention's varlen kernels and the Triton kernel, where each can run; `global` on the
reference, SDPA and FlashAttention.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from vr_hf import VisionRememberConfig
from vr_hf.modeling.configuration_vision_remember_settings import TRITON_WINDOWS
from vr_hf.modeling.image_layout import ImageLayout, image_windows
from vr_hf.modeling.vision_remember import VisionRemember, concat_windows
from vr_hf.modeling.vision_remember_attention import (
    AttentionSettings,
    attend_images,
    attend_windows,
    flash_problems,
    uses_torch_varlen,
)
from vr_hf.modeling.vision_remember_triton import feature_statistics, triton_problems, windowed_cross_attention

from measure import Ceilings, device_seconds, rotation_count


@dataclass
class Images:
    """One batch of images as the blocks see them: per image its feature rows and each token's window of them."""

    windows: list[torch.Tensor]
    rows: list[int]
    window_index: torch.Tensor  # (tokens, window), holes read row 0
    window_mask: torch.Tensor  # (tokens, window), at least one slot per token

    @classmethod
    def of(cls, config: VisionRememberConfig, image_size: int, images: int, device) -> "Images":
        windows = image_windows(config, [(image_size, image_size)] * images)
        rows = [ImageLayout.from_config(config).num_views((image_size, image_size)) * config.grid_size**2] * images
        index = concat_windows(windows, rows)
        mask = index >= 0
        mask[:, 0] |= ~mask.any(dim=1)  # as `prepare` leaves a newline token
        return cls(windows, rows, index.clamp(min=0).to(device), mask.to(device))

    @property
    def tokens_per_image(self) -> list[int]:
        return [len(window) for window in self.windows]


@dataclass
class Path:
    keys: Callable  # features -> the keys, once per forward
    attend: Callable  # (query, *keys) -> output, once per block


def local_path(module: VisionRemember, settings: AttentionSettings, images: Images) -> Path:
    index, mask, heads = images.window_index, images.window_mask, module.config.cross_attention_heads
    if settings.config._attn_implementation == TRITON_WINDOWS:
        norms = module.feature_norms
        return Path(
            keys=lambda features: (features, feature_statistics(features, len(norms), norms[0].eps)),
            attend=lambda query, features, statistics: windowed_cross_attention(
                query, features, norms, statistics, index, mask, settings.scaling
            ),
        )
    return Path(
        keys=lambda features: (module.gather_windows(features, index).unflatten(-1, (heads, -1)),),
        attend=lambda query, windows: attend_windows(settings, query, windows, mask),
    )


def global_path(module: VisionRemember, settings: AttentionSettings, images: Images) -> Path:
    device, heads = images.window_index.device, module.config.cross_attention_heads
    counts = images.tokens_per_image, images.rows
    lengths = tuple(torch.tensor(count, dtype=torch.int32, device=device) for count in counts)
    return Path(
        keys=lambda features: (module.normalize_features(features).unflatten(-1, (heads, -1)),),
        attend=lambda query, keys: attend_images(settings, query, keys, *counts, lengths),
    )


def implementations(interaction: str, settings: AttentionSettings, example: torch.Tensor) -> dict[str, str]:
    """Path name to `attn_implementation`, for the paths that can run here."""
    found = {"reference (eager)": "eager", "sdpa": "sdpa"}
    settings.config._attn_implementation = "flash_attention_2"
    if not flash_problems(settings, example):
        kernels = "torch" if uses_torch_varlen("flash_attention_2") else "flash-attn"
        found[f"flash varlen ({kernels})"] = "flash_attention_2"
    if interaction == "local" and not triton_problems(example):
        found["triton (fused)"] = TRITON_WINDOWS
    return found


def floors(interaction: str, images: Images, width: int, element: int, ceilings: Ceilings) -> dict:
    """What no path beats: building the keys reads every feature once (and, gathered, writes the windows); attending
    reads each key once per query group (a window, or a whole image) and the queries, and writes the outputs, with 4
    FLOPs per query, key and channel."""
    features, tokens = sum(images.rows), sum(images.tokens_per_image)
    present = int(images.window_mask.sum())
    if interaction == "local":
        keys_bytes, attend_bytes, flops = features * width, present * width, 4 * present * width
    else:
        keys_bytes, attend_bytes = 2 * features * width, features * width
        flops = 4 * width * sum(t * r for t, r in zip(images.tokens_per_image, images.rows))
    return dict(
        keys_floor_us=ceilings.floor_seconds(keys_bytes * element, 0) * 1e6,
        attend_floor_us=ceilings.floor_seconds((attend_bytes + 2 * tokens * width) * element, flops) * 1e6,
    )


def measure(config: VisionRememberConfig, image_size: int, images: int, device, dtype, ceilings: Ceilings) -> dict:
    """Every path's keys and attention time for one compression ratio, `local` and `global` interaction."""
    config = copy.deepcopy(config)
    torch.manual_seed(0)
    module = VisionRemember(config).to(device, dtype).eval()
    batch = Images.of(config, image_size, images, device)
    heads, width = config.cross_attention_heads, config.remember_feature_size
    settings = AttentionSettings(config, width // heads)
    tokens, element = sum(batch.tokens_per_image), torch.finfo(dtype).bits // 8
    sets = rotation_count((sum(batch.rows) + 2 * tokens) * width * element, device)
    generator = torch.Generator(device).manual_seed(0)
    features = [torch.randn(sum(batch.rows), width, device=device, generator=generator).to(dtype) for _ in range(sets)]
    queries = [
        torch.randn(tokens, heads, width // heads, device=device, generator=generator).to(dtype) for _ in range(sets)
    ]
    results = {}
    for interaction, make_path in (("local", local_path), ("global", global_path)):
        results[interaction] = {}
        for name, implementation in implementations(interaction, settings, features[0]).items():
            config._attn_implementation = implementation
            path = make_path(module, settings, batch)
            with torch.inference_mode():
                keys = [path.keys(feature) for feature in features]
                keys_seconds = device_seconds(path.keys, [(feature,) for feature in features], device)
                attend_seconds = device_seconds(path.attend, [(q, *k) for q, k in zip(queries, keys)], device)
            results[interaction][name] = dict(
                keys_us=keys_seconds * 1e6,
                attend_us=attend_seconds * 1e6,
                tokens=tokens,
                keys_per_token=config.downsample_factor**2 if interaction == "local" else max(batch.rows),
                **floors(interaction, batch, width, element, ceilings),
            )
    return results
