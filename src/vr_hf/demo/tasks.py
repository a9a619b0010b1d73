"""Synthetic fine-grained tasks, generated offline, on a 12 x 12 grid of 8-pixel cells (one vision patch each).

Two families:

- `red` (the main job): one item per cell, exactly one drawn in red; name it. Its question types:
  - `text`: rendered capital letters (DejaVu Sans Mono Bold, matplotlib's bundled font): "Which letter is red?"
  - `chart`: a scatter chart (matplotlib axes and markers): "Which marker is red?"

  A token pooled over an `s x s` window always mixes the red item with `s² - 1` neighbours, so pooling loses the
  answer entirely.
- `word` (Tables 2 and 5): a row of three letters on blank paper, one of them red. Its question types:
  - `which`: "Which letter is red?" The answer is sure to survive pooling only where no other letter shares the red
    one's window, which is rarer the larger the window.
  - `column`, position-grounded: "In which column (a to l) is the red letter?" A pooled token knows its window; the
    column inside it survives only as far as the tower's features tie position to what a patch holds.

Each item fills one vision patch, so one full-resolution patch identifies it: the detail Vision Remember exists to
recover. The cell layout is also returned, for pretraining the vision tower on patch-level classification.
"""

import io
from collections.abc import Callable
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
WORD_LENGTH = 3
COLUMNS = "abcdefghijkl"
WORD_QUESTIONS = {"which": "Which letter is red?", "column": "In which column (a to l) is the red letter?"}
RED, INK, PAPER = np.array([220, 30, 30]), np.array([20, 20, 20]), np.array([255, 255, 255])


@dataclass
class Sample:
    image: np.ndarray  # (IMAGE_SIZE, IMAGE_SIZE, 3) uint8
    task: str  # the question type
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
    """A `red` sample: every cell holds an item, one of them red."""
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


def make_word_sample(task: str, rng: np.random.Generator) -> Sample:
    """A `word` sample: three distinct letters side by side at a random place, one of them red."""
    canvas = np.tile(PAPER, (IMAGE_SIZE, IMAGE_SIZE, 1)).astype(np.float32)
    cell_items = np.full((GRID, GRID), EMPTY)
    cell_red = np.zeros((GRID, GRID), dtype=bool)
    row, first = rng.integers(GRID), rng.integers(GRID - WORD_LENGTH + 1)
    letters = rng.choice(list(LETTERS), size=WORD_LENGTH, replace=False)
    red = first + rng.integers(WORD_LENGTH)
    for column, letter in enumerate(letters, start=first):
        draw(canvas, row, column, letter_masks()[letter], RED if column == red else INK)
        cell_items[row, column], cell_red[row, column] = ITEMS.index(letter), column == red
    answer = letters[red - first] if task == "which" else COLUMNS[red]
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    return Sample(image, task, WORD_QUESTIONS[task], answer, cell_items, cell_red)


@dataclass(frozen=True)
class Family:
    questions: dict[str, str]  # question type -> question
    make_sample: Callable[[str, np.random.Generator], Sample]
    tower_learns_columns: bool  # whether the tower is pretrained to say each patch's column too


FAMILIES = {
    "red": Family(QUESTIONS, make_sample, tower_learns_columns=False),
    "word": Family(WORD_QUESTIONS, make_word_sample, tower_learns_columns=True),
}


def make_split(size: int, seed: int, family: str = "red") -> list[Sample]:
    """`size` samples of a family, half of each of its two question types, in a seeded random order."""
    rng = np.random.default_rng(seed)
    tasks = list(FAMILIES[family].questions) * (size // 2)
    return [FAMILIES[family].make_sample(tasks[index], rng) for index in rng.permutation(len(tasks))]
