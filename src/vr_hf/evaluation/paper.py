"""The paper's 11 benchmarks by their lmms-eval task names, and its Table 1 layout filled from lmms-eval's results."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    column: str
    task: str  # lmms-eval task name
    metric: str  # lmms-eval metric: results["results"][task][f"{metric},none"]
    full_score: float = 1.0  # the metric's best value; MME's perception score is a sum over 10 subtasks of 200 each

    def value(self, results: dict) -> float | None:
        return results.get("results", {}).get(self.task, {}).get(f"{self.metric},none")

    def percent(self, results: dict) -> float | None:
        value = self.value(results)
        return None if value is None else 100 * value / self.full_score

    def shown(self, results: dict) -> str:
        """As papers print it: MME-P as its raw score (of 2000), the others in %."""
        value = self.value(results)
        if value is None:
            return "–"
        return f"{value:.1f}" if self.full_score != 1 else f"{100 * value:.1f}"


GROUPS = {
    "General": (
        Benchmark("GQA", "gqa", "exact_match"),
        Benchmark("MME-P", "mme", "mme_perception_score", full_score=2000),
        Benchmark("RealWorldQA", "realworldqa", "exact_match"),
    ),
    "Knowledge": (
        Benchmark("SQA-IMG", "scienceqa_img", "exact_match"),
        Benchmark("AI2D", "ai2d", "exact_match"),
        Benchmark("MMMU", "mmmu_val", "mmmu_acc"),
        Benchmark("MMStar", "mmstar", "average"),
    ),
    "OCR&Chart": (
        Benchmark("ChartQA", "chartqa", "relaxed_overall"),
        Benchmark("DocVQA", "docvqa_val", "anls"),
        Benchmark("TextVQA", "textvqa_val", "exact_match"),
        Benchmark("OCRBench", "ocrbench", "ocrbench_accuracy"),
    ),
}
BENCHMARKS = [benchmark for group in GROUPS.values() for benchmark in group]
TASKS = [benchmark.task for benchmark in BENCHMARKS]


def average(results: dict) -> float | None:
    """Mean of the 11 scores in % (MME-P as % of 2000); None unless all 11 are there."""
    scores = [benchmark.percent(results) for benchmark in BENCHMARKS]
    return None if None in scores else sum(scores) / len(scores)


def table(runs: dict[str, dict]) -> str:
    """Table 1 as Markdown: one row per model name in `runs`, each the results dict lmms-eval returns or writes."""
    groups = [""]
    for name, group in GROUPS.items():
        groups += [name] + [""] * (len(group) - 1)
    lines = [
        row(groups + ["Average"]),
        row(["---"] * (len(BENCHMARKS) + 2)),
        row(["Model"] + [benchmark.column for benchmark in BENCHMARKS] + ["Avg"]),
    ]
    for model, results in runs.items():
        mean = average(results)
        cells = [benchmark.shown(results) for benchmark in BENCHMARKS]
        lines.append(row([model] + cells + ["–" if mean is None else f"{mean:.1f}"]))
    return "\n".join(lines)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
