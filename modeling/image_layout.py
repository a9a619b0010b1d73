"""Where each vision token comes from: views of an image in, the LLaVA-NeXT token sequence out.

One method lays out both the projected tokens and their feature windows, so the two can never disagree: AnyRes tiles
are stitched into one grid, unpadded to the image's aspect ratio, and closed by a newline token per row, exactly as
LLaVA-NeXT does it, whatever the channels hold. The processor counts image tokens with the same method.
"""

from dataclasses import dataclass

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .configuration_llava_vr import VisionRememberConfig
from .vision_remember import NO_WINDOW, block_windows


@dataclass(frozen=True)
class ImageLayout:
    tokens_per_side: int  # vision tokens per side of one view
    view_size: int  # pixels per side of one view
    grid_pinpoints: list | None  # AnyRes resolutions; None for one view per image

    @classmethod
    def from_config(cls, config: VisionRememberConfig) -> "ImageLayout":
        return cls(config.tokens_per_side, config.vision_config.image_size, config.image_grid_pinpoints)

    def num_views(self, image_size) -> int:
        """Views the vision tower sees for one image: 1 without AnyRes, else the base image plus its tiles."""
        if self.grid_pinpoints is None:
            return 1
        return image_size_to_num_patches(image_size, self.grid_pinpoints, self.view_size)

    def pack(self, views: torch.Tensor, image_size, newline: torch.Tensor) -> torch.Tensor:
        """`(views, n*n, C)` per-view tokens to the image's `(tokens, C)` sequence: the base view, then the unpadded
        tile grid with `newline` closing each row. Without AnyRes, the single view's tokens as they are."""
        if self.grid_pinpoints is None:
            return views[0]
        side = self.tokens_per_side
        rows, columns = get_anyres_image_grid_shape(image_size, self.grid_pinpoints, self.view_size)
        grid = views[1:].view(rows, columns, side, side, -1).permute(4, 0, 2, 1, 3)
        grid = unpad_image(grid.reshape(-1, rows * side, columns * side), image_size)
        grid = torch.cat([grid, newline[:, None, None].expand(-1, grid.shape[1], 1).to(grid)], dim=-1)
        return torch.cat([views[0], grid.flatten(1).T])

    def num_tokens(self, image_size) -> int:
        """Vision tokens one image becomes, newlines included."""
        views = torch.zeros(self.num_views(image_size), self.tokens_per_side**2, 1)
        return len(self.pack(views, image_size, torch.zeros(1)))


def image_windows(config: VisionRememberConfig, image_sizes: list) -> list[torch.Tensor]:
    """Per image, on the host, `(tokens, s*s)`: the rows of the image's concatenated per-view features that each of
    its vision tokens was pooled from; newline tokens have no window (-1)."""
    layout = ImageLayout.from_config(config)
    grid = config.grid_size
    windows = block_windows(grid, grid, config.downsample_factor)
    no_window = torch.full((windows.shape[1],), NO_WINDOW)
    offsets = torch.arange(max(layout.num_views(size) for size in image_sizes)) * grid**2
    return [
        layout.pack(windows[None] + offsets[: layout.num_views(size), None, None], size, no_window)
        for size in image_sizes
    ]
