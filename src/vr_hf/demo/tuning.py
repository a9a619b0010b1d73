"""The tuning budget of the paper's tables (`--sweep`): every compared model, baseline, rival, Vision Remember and
ceiling alike, trains once per learning rate of the sweep; a validation split (images of its own, never the held-out
ones) chooses the rate per model and seed, and the tables report the chosen run's held-out answers only. Without a
sweep every model trains once at `--learning-rate`: no model is tuned.
"""

from .settings import Settings
from .tasks import Sample, make_split


VALIDATION_SEED = 30_000


def validation_split(settings: Settings) -> list[Sample]:
    return make_split(settings.test_size, VALIDATION_SEED, settings.task)


def choose(results: list[dict], sweep: list[float]) -> list[dict]:
    """Per model and seed, the run of the best validation accuracy (of equals, the one earliest in `sweep`), with
    every rate's validation accuracy under `tuning`."""
    groups = {}
    for result in results:
        groups.setdefault((tuple(result["model"].items()), result["seed"]), []).append(result)
    chosen = []
    for runs in groups.values():
        best = max(runs, key=lambda run: (run["validation_accuracy"], -sweep.index(run["learning_rate"])))
        by_rate = sorted(runs, key=lambda run: run["learning_rate"])
        chosen.append(dict(best, tuning={f"{run['learning_rate']:g}": run["validation_accuracy"] for run in by_rate}))
    return chosen


def summary(results: list[dict], sweep: list[float]) -> str:
    """One line that says each model's tuning budget and which rates won how often."""
    if not sweep:
        return "Tuning budget: none; every model trained once at the same learning rate."
    wins = {f"{rate:g}": sum(result["learning_rate"] == rate for result in results) for rate in sweep}
    counts = ", ".join(f"{rate} {count}x" for rate, count in wins.items())
    return (
        f"Tuning budget, every model and seed alike: learning rates {', '.join(wins)}, each chosen by validation "
        f"accuracy (chosen: {counts})."
    )
