"""A synthetic fine-grained task, generated offline: find the red item among many and name it.

Two task types share one layout: a 12 x 12 grid of 8-pixel cells, one item per cell, exactly one drawn in red.

- `text`: rendered capital letters (DejaVu Sans Mono Bold, matplotlib's bundled font): "Which letter is red?"
- `chart`: a scatter chart (matplotlib axes and markers): "Which marker is red?"

Each item fills about one vision patch, so one full-resolution patch identifies it while a token pooled over an
`s x s` window mixes it with its neighbours: the detail Vision Remember exists to recover. The cell layout is also
returned, for pretraining the vision tower on patch-level classification.
"""

import io
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont


matplotlib.use("Agg")

CELL = 8
GRID = 12
IMAGE_SIZE = CELL * GRID
LETTERS = "EFHKLNTXYZ"
MARKERS = {"circle": "o", "square": "s", "triangle": "^", "diamond": "D", "plus": "P", "cross": "X", "star": "*"}
ITEMS = list(LETTERS) + list(MARKERS)  # patch classes; index len(ITEMS) is an empty cell
EMPTY = len(ITEMS)
QUESTIONS = {"text": "Which letter is red?", "chart": "Which marker is red?"}
RED, INK, PAPER = np.array([220, 30, 30]), np.array([20, 20, 20]), np.array([255, 255, 255])


@dataclass
class Sample:
    image: np.ndarray  # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    task: str
    question: str
    answer: str
    cell_items: np.ndarray  # (GRID, GRID) item index per cell, EMPTY where none
    cell_red: np.ndarray  # (GRID, GRID) bool


def font_path() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSansMono-Bold.ttf"


@cache
def letter_masks() -> dict[str, np.ndarray]:
    """Coverage in [0, 1] of each letter in a cell, rendered at 4x and box-filtered down."""
    font = ImageFont.truetype(str(font_path()), size=4 * CELL)
    masks = {}
    for letter in LETTERS:
        canvas = Image.new("L", (4 * CELL, 4 * CELL), 0)
        ImageDraw.Draw(canvas).text((2 * CELL, 2 * CELL), letter, fill=255, font=font, anchor="mm")
        masks[letter] = np.asarray(canvas.resize((CELL, CELL), Image.BOX), dtype=np.float32) / 255
    return masks


@cache
def marker_masks() -> dict[str, np.ndarray]:
    """Coverage of each matplotlib marker in a cell."""
    from matplotlib import pyplot as plt

    masks = {}
    for name, marker in MARKERS.items():
        figure = plt.figure(figsize=(1, 1), dpi=4 * CELL)
        axes = figure.add_axes((0, 0, 1, 1))
        axes.set_axis_off()
        axes.plot([0], [0], marker=marker, markersize=4 * CELL * 0.75 * 72 / figure.dpi, color="black")
        axes.set_xlim(-1, 1)
        axes.set_ylim(-1, 1)
        pixels = render(figure)[..., 0]
        plt.close(figure)
        coverage = Image.fromarray(255 - pixels).resize((CELL, CELL), Image.BOX)
        masks[name] = np.asarray(coverage, dtype=np.float32) / 255
    return masks


@cache
def chart_background() -> np.ndarray:
    """Matplotlib axes with light grid lines, one per cell: the scatter chart's frame."""
    from matplotlib import pyplot as plt

    figure = plt.figure(figsize=(1, 1), dpi=IMAGE_SIZE)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, GRID)
    axes.set_ylim(0, GRID)
    axes.set_xticks(range(GRID + 1))
    axes.set_yticks(range(GRID + 1))
    axes.tick_params(length=0, labelleft=False, labelbottom=False)
    axes.grid(color="#d8d8d8", linewidth=0.5)
    background = render(figure)
    plt.close(figure)
    return background


def render(figure) -> np.ndarray:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=figure.dpi)
    return np.asarray(Image.open(buffer).convert("RGB"))


def draw(canvas: np.ndarray, row: int, column: int, mask: np.ndarray, color: np.ndarray):
    cell = canvas[row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL]
    cell[:] = cell * (1 - mask[..., None]) + color * mask[..., None]


def make_sample(task: str, rng: np.random.Generator) -> Sample:
    names = list(LETTERS) if task == "text" else list(MARKERS)
    masks = letter_masks() if task == "text" else marker_masks()
    canvas = (np.tile(PAPER, (IMAGE_SIZE, IMAGE_SIZE, 1)) if task == "text" else chart_background()).astype(np.float32)
    cell_items = np.full((GRID, GRID), EMPTY)
    cell_red = np.zeros((GRID, GRID), dtype=bool)
    red_row, red_column = rng.integers(GRID, size=2)
    for row in range(GRID):
        for column in range(GRID):
            name = names[rng.integers(len(names))]
            red = row == red_row and column == red_column
            draw(canvas, row, column, masks[name], RED if red else INK)
            cell_items[row, column], cell_red[row, column] = ITEMS.index(name), red
    answer = ITEMS[cell_items[red_row, red_column]]
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Sample(image, task, QUESTIONS[task], answer, cell_items, cell_red)


def make_split(size: int, seed: int) -> list[Sample]:
    """`size` samples, half of each task type, in a seeded random order."""
    rng = np.random.default_rng(seed)
    tasks = ["text", "chart"] * (size // 2)
    return [make_sample(tasks[index], rng) for index in rng.permutation(len(tasks))]
