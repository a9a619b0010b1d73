"""Where each vision token comes from: views of an image in, the LLaVA-NeXT token sequence out.

One method lays out both the projected tokens and their feature windows, so the two can never disagree: AnyRes tiles
are stitched into one grid, unpadded to the image's aspect ratio, and closed by a newline token per row, exactly as
LLaVA-NeXT does it, whatever the channels hold. The processor counts image tokens with the same method.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from .configuration_vision_remember import VisionRememberConfig


NO_WINDOW = -1


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


def view_windows(config: VisionRememberConfig, device=None) -> torch.Tensor:
    """`(n*n, s*s)`: for each token of a view, the row-major patches of its `s x s` window."""
    grid, stride = config.grid_size, config.downsample_factor
    patches = torch.arange(grid * grid, device=device).view(grid // stride, stride, grid // stride, stride)
    return patches.permute(0, 2, 1, 3).reshape(-1, stride * stride)


def stack_windows(windows: list[torch.Tensor]) -> torch.Tensor:
    """Stack `(tokens, window)` blocks of different window widths into one, padded with `NO_WINDOW`."""
    width = max(window.shape[1] for window in windows)
    return torch.cat([F.pad(window, (0, width - window.shape[1]), value=NO_WINDOW) for window in windows])


def image_windows(config: VisionRememberConfig, image_sizes: list, device=None) -> list[torch.Tensor]:
    """Per image, `(tokens, window)`: the rows of the concatenated per-view features each vision token attends to.

    Rows count over all views of all images in order; newline tokens have no window (-1). With `global` interaction
    a token's window is every feature of its image.
    """
    layout = ImageLayout.from_config(config)
    patches_per_view = config.grid_size**2
    windows = view_windows(config, device)
    no_window = torch.full((windows.shape[1],), NO_WINDOW, device=device)
    packed, first_view = [], 0
    for image_size in image_sizes:
        count = layout.num_views(image_size)
        offsets = (first_view + torch.arange(count, device=device)) * patches_per_view
        image = layout.pack(windows[None] + offsets[:, None, None], image_size, no_window)
        if config.interaction == "global":
            every_feature = torch.arange(count * patches_per_view, device=device) + first_view * patches_per_view
            image = torch.where(image[:, :1] >= 0, every_feature, NO_WINDOW)
        packed.append(image)
        first_view += count
    return packed
