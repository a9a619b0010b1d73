"""LLaVA-style instruction data to TRL's vision format.

A LLaVA row::

    {"id": "000001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}

becomes a row of a `datasets.Dataset` with the two columns `trl.SFTTrainer` expects for vision data::

    {"images": [<PIL.Image>],
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]}

Images are checked (opened and decoded) while converting, and stored by path: the dataset decodes them lazily, so a
large dataset does not sit in memory. Rows without an image are valid text-only rows (`images == []`).

Bad rows (a missing or unreadable image, no assistant turn, an unknown speaker, `<image>` placeholders that do not
match the images) are reported with their row id in a `LoadReport`; `on_error="skip"` leaves them out,
`on_error="raise"` raises a `ValueError` naming the first one. Either way nothing crashes half-way through a run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class RowError(ValueError):
    """One bad row: `row_id` names it, `reason` is a short category used for counting."""

    def __init__(self, row_id, reason: str, detail: str):
        self.row_id, self.reason, self.detail = row_id, reason, detail
        super().__init__(f"Row {row_id!r}: {detail}")


@dataclass
class LoadReport:
    """What `load_llava_json` read, kept and left out, and why."""

    rows_read: int = 0
    rows_kept: int = 0
    text_only_rows: int = 0
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (row id, reason, detail)

    @property
    def rows_skipped(self) -> int:
        return len(self.problems)

    @property
    def counts(self) -> Counter:
        """Bad rows per reason: `missing_image`, `unreadable_image`, `no_assistant_turn`, ..."""
        return Counter(reason for _, reason, _ in self.problems)

    def skipped_ids(self, reason: str | None = None) -> list[str]:
        return [row_id for row_id, why, _ in self.problems if reason is None or why == reason]

    def __str__(self) -> str:
        lines = [
            f"read {self.rows_read} rows, kept {self.rows_kept} ({self.text_only_rows} text-only), "
            f"skipped {self.rows_skipped}"
        ]
        lines += [f"  {reason}: {count}" for reason, count in sorted(self.counts.items())]
        lines += [f"  row {row_id!r}: {detail}" for row_id, _, detail in self.problems[:20]]
        if len(self.problems) > 20:
            lines.append(f"  ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


def read_rows(json_path) -> list:
    """A JSON list of rows, or JSON Lines (one row per line)."""
    path = Path(json_path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [parse_json(line, path, number) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = parse_json(text, path)
    if not isinstance(rows, list):
        raise ValueError(f"{path} holds a JSON {type(rows).__name__}, expected a list of rows.")
    return rows


def check_image(path: Path, row_id) -> str:
    if not path.is_file():
        raise RowError(row_id, "missing_image", f"image file {str(path)!r} does not exist.")
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises several types for bad files
        raise RowError(row_id, "unreadable_image", f"image file {str(path)!r} cannot be read: {error}") from error
    return str(path)


def convert_turn(turn, row_id, index: int) -> tuple[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise RowError(row_id, "bad_conversation", f"turn {index} is not a {{'from': ..., 'value': ...}} object.")
    role = ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise RowError(row_id, "bad_conversation", f"turn {index} has unknown speaker {turn['from']!r}.")
    if not isinstance(turn["value"], str):
        raise RowError(row_id, "bad_conversation", f"turn {index} has a non-text value.")
    return role, turn["value"]


def user_content(text: str) -> list[dict]:
    """Text with `<image>` placeholders, to content parts in the same order."""
    parts = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for index, piece in enumerate(pieces):
        if index > 0:
            parts.append({"type": "image", "text": None})
        if len(pieces) > 1:  # LLaVA writes "<image>\nQuestion": the newline only separated the placeholder
            piece = piece.strip("\n")
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def convert_row(row, image_folder: Path | None, index: int) -> dict:
    """One LLaVA row to `{"images": [paths], "messages": [...]}`, or a `RowError`."""
    row_id = row.get("id", f"#{index}") if isinstance(row, dict) else f"#{index}"
    if not isinstance(row, dict):
        raise RowError(row_id, "bad_row", f"row {index} is a {type(row).__name__}, not an object.")
    row_id = str(row_id)

    image_field = row.get("image")
    image_names = [] if image_field is None else [image_field] if isinstance(image_field, str) else image_field
    if not isinstance(image_names, list) or not all(isinstance(name, str) for name in image_names):
        raise RowError(row_id, "bad_row", f"'image' must be a path or a list of paths, got {image_field!r}.")

    conversations = row.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise RowError(row_id, "no_assistant_turn", "the row has no conversation.")
    turns = [convert_turn(turn, row_id, i) for i, turn in enumerate(conversations)]
    if not any(role == "assistant" for role, _ in turns):
        raise RowError(row_id, "no_assistant_turn", "the conversation has no assistant ('gpt') turn to train on.")

    placeholders = sum(value.count(IMAGE_PLACEHOLDER) for role, value in turns if role == "user")
    if any(IMAGE_PLACEHOLDER in value for role, value in turns if role != "user"):
        raise RowError(row_id, "image_placeholder_mismatch", "an <image> placeholder outside a user turn.")
    if placeholders not in (0, len(image_names)):
        raise RowError(
            row_id,
            "image_placeholder_mismatch",
            f"{placeholders} <image> placeholders for {len(image_names)} images.",
        )

    messages = []
    for role, value in turns:
        if role == "user":
            content = user_content(value)
        else:
            content = [{"type": "text", "text": value}]
        messages.append({"role": role, "content": content})
    if image_names and placeholders == 0:  # LLaVA's convention: the image goes before the first question
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise RowError(row_id, "image_placeholder_mismatch", "the row has images but no user turn to put them in.")
        first_user["content"][:0] = [{"type": "image", "text": None} for _ in image_names]

    folder = image_folder if image_folder is not None else Path(".")
    images = [check_image(folder / name, row_id) for name in image_names]
    return {"id": row_id, "images": images, "messages": messages}


def convert_llava_rows(rows: list, image_folder=None, on_error: str = "skip") -> tuple[list[dict], LoadReport]:
    """Convert rows in memory; images stay paths. See `load_llava_json`."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}.")
    folder = None if image_folder is None else Path(os.fspath(image_folder))
    report = LoadReport()
    converted = []
    for index, row in enumerate(rows):
        report.rows_read += 1
        try:
            example = convert_row(row, folder, index)
        except RowError as error:
            if on_error == "raise":
                raise
            report.problems.append((str(error.row_id), error.reason, error.detail))
            continue
        converted.append(example)
        report.rows_kept += 1
        report.text_only_rows += not example["images"]
    return converted, report


def parse_json(text: str, path: Path, line: int | None = None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line}" if line is not None else f"line {error.lineno}, column {error.colno}"
        raise ValueError(f"{path} is not valid JSON at {where}: {error.msg}.") from None


def load_llava_json(json_path, image_folder=None, on_error: str = "skip", keep_ids: bool = True):
    """Load LLaVA-style JSON (or `.jsonl`) into a `datasets.Dataset` with `images` and `messages` columns for TRL.

    Args:
        json_path: The JSON file: a list of `{"id", "image", "conversations"}` rows.
        image_folder: Folder the rows' `image` paths are relative to (defaults to the JSON file's folder).
        on_error (`"skip"` or `"raise"`): Leave bad rows out (and report them), or raise a `ValueError` naming the
            first bad row.
        keep_ids (`bool`): Keep an `id` column (TRL ignores extra columns).

    Returns:
        `(dataset, report)`: the `datasets.Dataset`, whose `images` column decodes to `PIL.Image`s lazily, and a
        `LoadReport` with the counts and the id and reason of every row left out.

    Raises:
        ValueError: where no row is left, or rows have images and none of them could be read (a wrong image folder,
            most likely): training on what is left would not be what was asked for.
    """
    import datasets

    folder = Path(os.fspath(json_path)).parent if image_folder is None else Path(os.fspath(image_folder))
    rows, report = convert_llava_rows(read_rows(json_path), folder, on_error)
    unreadable = report.counts["missing_image"] + report.counts["unreadable_image"]
    if report.rows_kept == report.text_only_rows and unreadable:
        raise ValueError(
            f"{report}\nNone of the {unreadable} rows with images in {json_path} could be used: their image paths are "
            f"read relative to {str(folder)!r} (image_folder, by default the JSON file's folder). Is that where the "
            "images are?"
        )
    if not rows:
        raise ValueError(f"{report}\nNo row of {json_path} can be trained on.")
    content = datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")})
    features = {
        "images": datasets.List(datasets.Image()),
        "messages": datasets.List({"role": datasets.Value("string"), "content": content}),
    }
    if keep_ids:
        features = {"id": datasets.Value("string"), **features}
    else:
        rows = [{key: value for key, value in row.items() if key != "id"} for row in rows]
    dataset = datasets.Dataset.from_list(rows, features=datasets.Features(features))
    return dataset, report


__all__ = ["LoadReport", "RowError", "convert_llava_rows", "load_llava_json"]
