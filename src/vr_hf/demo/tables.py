"""The tables `vr-hf` can make, the models each needs, and how their results are summarised.

- `main`: pooling vs pooling + Vision Remember at the chosen ratios (the default job, on the `red` task).
- `2` (on the graded `word` task by default, as is `5`): the paper's Table 2 in miniature: ratios 1/4, 1/9 and
  1/16, each baseline vs Vision Remember, and the uncompressed ceiling (ratio 1/1) that tells how much each ratio
  loses.
- `3`: the paper's Table 3 in miniature, at 1/9: Vision Remember against the re-fusion methods DeepStack (as Qwen3-VL
  runs it) and Cambrian-1's Spatial Vision Aggregator, each in Vision Remember's place after decoder layer 0, reading
  the same multi-level features (`refusion`).
- `4`: the paper's Table 4 in miniature, at 1/9: Vision Remember against the efficient-token methods FastV (no
  pooling; after decoder layer 0 only the 1/9 of the vision tokens the prompt's last token attends to most remain)
  and TokenPacker's projector (`fastv_layer`, `projector_type="tokenpacker"`).
- `5`: the paper's Table 5a-b in miniature, at 1/9: which parts matter (local attention, + multi-level features,
  + bidirectional self-attention, + text guidance) and which interaction (local, deformable, global). Its 5c, the
  insertion layers, needs a deeper decoder than the tiny one: with two layers, only blocks after the first can change
  an answer.

Every row compares a model with the pooling baseline at its ratio, on the same held-out questions and seeds: the
gain, the fraction of the compression loss it recovers, (model - baseline) / (ceiling - baseline), with a paired
bootstrap interval, and a sign test (`statistics`).
"""

import math
from dataclasses import dataclass

import numpy as np

from . import statistics


@dataclass(frozen=True)
class Model:
    """One model a table trains: its compression (window side `s`, ratio 1/s²) and its variant of the pooling
    baseline."""

    downsample_factor: int
    variant: str = "baseline"

    @property
    def config_overrides(self) -> dict:
        """The config settings this variant changes from the pooling baseline's."""
        overrides = VARIANTS[self.variant]
        return overrides(self.downsample_factor) if callable(overrides) else overrides

    @property
    def name(self) -> str:
        return f"1/{self.downsample_factor**2} {self.variant}"


def fastv(side: int) -> dict:
    """FastV at ratio 1/side²: no pooling, and from decoder layer 1 on only 1/side² of the vision tokens remain (the
    tiny decoder's layer 0 ranks them; FastV's own default is layer 2 of 32)."""
    return dict(downsample_factor=1, fastv_layer=1, fastv_keep_ratio=1 / side**2)


VISION_REMEMBER = dict(use_vision_remember=True)
VARIANTS = {
    "baseline": {},
    "vision-remember": VISION_REMEMBER,
    "local attention": dict(VISION_REMEMBER, multi_level=False, bidirectional=False, text_guidance=False),
    "+ multi-level": dict(VISION_REMEMBER, bidirectional=False, text_guidance=False),
    "+ bidirectional": dict(VISION_REMEMBER, text_guidance=False),
    "deformable": dict(VISION_REMEMBER, interaction="deformable"),
    "global": dict(VISION_REMEMBER, interaction="global"),
    "deepstack": dict(VISION_REMEMBER, refusion="deepstack"),
    "sva": dict(VISION_REMEMBER, refusion="sva"),
    "tokenpacker": dict(projector_type="tokenpacker"),
    "fastv": fastv,
    "pixel shuffle": dict(projector_type="pixel_shuffle"),  # lossless compression, in no table: for learning_curve
}
CEILING = Model(1)


@dataclass(frozen=True)
class Row:
    label: str
    model: Model
    ceiling: Model | None = None

    @property
    def baseline(self) -> Model:
        return Model(self.model.downsample_factor)

    def models(self) -> list[Model]:
        return [model for model in (self.ceiling, self.baseline, self.model) if model is not None]


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    sections: dict[str, list[Row]]
    model_column: str = "+ Vision Remember"

    def models(self) -> list[Model]:
        return list(dict.fromkeys(model for rows in self.sections.values() for row in rows for model in row.models()))


def main_table(ratios: list[int]) -> Table:
    rows = [Row(f"1/{side**2}", Model(side, "vision-remember")) for side in ratios]
    return Table("results", "Pooling vs pooling + Vision Remember", {"": rows})


def table_2() -> Table:
    rows = [Row(f"1/{side**2}", Model(side, "vision-remember"), CEILING) for side in (2, 3, 4)]
    return Table("table2", "Table 2 in miniature: compression ratios", {"": rows})


def table_3() -> Table:
    methods = {"Vision Remember": "vision-remember", "DeepStack": "deepstack", "SVA": "sva"}
    rows = [Row(label, Model(3, variant), CEILING) for label, variant in methods.items()]
    return Table("table3", "Table 3 in miniature: re-fusion methods at 1/9", {"": rows}, model_column="the method")


def table_4() -> Table:
    methods = {"Vision Remember": "vision-remember", "FastV": "fastv", "TokenPacker": "tokenpacker"}
    rows = [Row(label, Model(3, variant), CEILING) for label, variant in methods.items()]
    title = "Table 4 in miniature: efficient-token methods at 1/9"
    return Table("table4", title, {"": rows}, model_column="the method")


def table_5() -> Table:
    def row(label: str, variant: str) -> Row:
        return Row(label, Model(3, variant), CEILING)

    full = "vision-remember"
    return Table(
        "table5",
        "Table 5a-b in miniature, at 1/9",
        {
            "a. components": [
                row("local attention", "local attention"),
                row("+ multi-level", "+ multi-level"),
                row("+ bidirectional", "+ bidirectional"),
                row("+ text guidance", full),
            ],
            "b. interaction": [row("local", full), row("deformable", "deformable"), row("global", "global")],
        },
        model_column="the variant",
    )


def tables(names: list[str], ratios: list[int]) -> list[Table]:
    builders = {"main": lambda: main_table(ratios), "2": table_2, "3": table_3, "4": table_4, "5": table_5}
    return [builders[name]() for name in names]


def correct_matrix(results: list[dict], model: Model, seeds: list[int]) -> np.ndarray:
    """`(seeds, questions)` booleans of one model, every task type's questions in a row, seeds in `seeds` order."""
    by_seed = {result["seed"]: result for result in results if Model(**result["model"]) == model}
    rows = [[hit for task_hits in by_seed[seed]["correct"].values() for hit in task_hits] for seed in seeds]
    return np.array(rows, dtype=bool)


def summarize_row(row: Row, results: list[dict], seeds: list[int]) -> dict:
    """Accuracies (in %), gain and fraction recovered of one row, each with a 95% paired bootstrap interval."""
    correct = {
        "baseline": correct_matrix(results, row.baseline, seeds),
        "model": correct_matrix(results, row.model, seeds),
    }
    if row.ceiling is not None:
        correct["ceiling"] = correct_matrix(results, row.ceiling, seeds)
    accuracy = {name: 100 * float(matrix.mean()) for name, matrix in correct.items()}
    summary = {
        "label": row.label,
        "accuracy": accuracy,
        "seed_spread": {
            name: 100 * float(np.std(matrix.mean(axis=1), ddof=min(1, len(seeds) - 1)))
            for name, matrix in correct.items()
        },
        "gain": gain(accuracy),
        "gain_interval": statistics.interval(100 * statistics.bootstrap(correct, gain)),
        "sign_test_p": statistics.sign_test(*statistics.disagreements(correct["model"], correct["baseline"])),
    }
    if row.ceiling is not None:
        summary["recovered"] = recovered(accuracy)
        summary["recovered_interval"] = statistics.interval(statistics.bootstrap(correct, recovered))
    return summary


def gain(accuracy: dict[str, float]) -> float:
    return accuracy["model"] - accuracy["baseline"]


def recovered(accuracy: dict[str, float]) -> float:
    return statistics.fraction_recovered(accuracy["ceiling"], accuracy["baseline"], accuracy["model"])


def summarize(table: Table, results: list[dict], seeds: list[int]) -> dict[str, list[dict]]:
    return {section: [summarize_row(row, results, seeds) for row in rows] for section, rows in table.sections.items()}


def format_table(table: Table, summary: dict[str, list[dict]], seeds: list[int], prior: float, questions: int) -> str:
    """A Markdown table: one row per comparison, accuracies in % (mean over seeds), intervals at 95%."""
    has_ceiling = any(row.ceiling for rows in table.sections.values() for row in rows)
    header = [""] + ["ceiling (1/1)"] * has_ceiling + ["baseline", table.model_column, "gain [95% CI]"]
    header += ["recovered [95% CI]"] * has_ceiling + ["sign test p"]
    lines = [
        f"{table.title}: held-out accuracy (%), mean of {len(seeds)} seed(s) x {questions} questions; "
        f"answer prior {100 * prior:.1f}%",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for section, rows in summary.items():
        if section:
            lines.append(f"| **{section}** |" + " |" * (len(header) - 1))
        for row in rows:
            accuracy, (low, high) = row["accuracy"], row["gain_interval"]
            cells = [row["label"]] + ([f"{accuracy['ceiling']:.1f}"] if has_ceiling else [])
            cells += [
                f"{accuracy['baseline']:.1f}",
                f"{accuracy['model']:.1f}",
                f"{row['gain']:+.1f} [{low:+.1f}, {high:+.1f}]",
            ]
            if has_ceiling:
                low, high = row["recovered_interval"]
                cells.append(f"{percent(row['recovered'])} [{percent(low)}, {percent(high)}]")
            cells.append(f"{row['sign_test_p']:.2g}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percent(fraction: float) -> str:
    return "n/a" if math.isnan(fraction) else f"{100 * fraction:.0f}%"


def plot(table: Table, summary: dict[str, list[dict]], prior: float, path: str):
    """One bar group per row: ceiling, baseline and model accuracies, the answer prior as a dashed line."""
    from matplotlib import pyplot as plt

    rows = [row for section in summary.values() for row in section]
    labels = [row["label"] for row in rows]
    bars = [name for name in ("ceiling", "baseline", "model") if name in rows[0]["accuracy"]]
    names = {"ceiling": "uncompressed (1/1)", "baseline": "pooling", "model": table.model_column}
    width = 0.8 / len(bars)
    figure, axis = plt.subplots(figsize=(max(4.0, 1.1 * len(rows) + 1.5), 3.8))
    for index, bar in enumerate(bars):
        positions = [column + (index - (len(bars) - 1) / 2) * width for column in range(len(rows))]
        means = [row["accuracy"][bar] for row in rows]
        spreads = [row["seed_spread"][bar] for row in rows]
        axis.bar(positions, means, width=width, yerr=spreads, capsize=2, label=names[bar])
    axis.axhline(100 * prior, color="gray", linestyle="--", linewidth=1, label="answer prior")
    axis.set_xticks(
        range(len(rows)),
        labels,
        rotation=20 if len(rows) > 4 else 0,
        ha="right" if len(rows) > 4 else "center",
        fontsize=8,
    )
    axis.set_ylabel("held-out accuracy (%)")
    axis.set_ylim(0, 105)
    axis.set_title(table.title, fontsize=9)
    figure.legend(fontsize=7, loc="lower center", ncol=len(bars) + 1, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))  # the legend sits below the axes, off the bars
    figure.savefig(path, dpi=120)
    plt.close(figure)
