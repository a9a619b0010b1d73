"""Paired statistics for models scored on the same held-out questions, over several seeds.

Every model of a table answers the same questions, and models trained with the same seed share their data and every
weight they have in common, so comparisons are paired: a bootstrap draws seeds and questions with replacement, the
same draw for every model, and recomputes each statistic on it. An exact sign test on the question-seed pairs that two
models answer differently gives a p-value for "one is better than the other" that assumes nothing about the spread.
"""

import math
from collections.abc import Callable

import numpy as np


CONFIDENCE = 0.95


def fraction_recovered(ceiling: float, baseline: float, remember: float) -> float:
    """Share of what compression loses (uncompressed minus compressed accuracy) that Vision Remember gives back:
    1 is all of it, 0 none, negative worse than the baseline; NaN where compression loses nothing."""
    lost = ceiling - baseline
    return (remember - baseline) / lost if lost > 0 else math.nan


def bootstrap(
    correct: dict[str, np.ndarray],
    statistic: Callable[[dict[str, float]], float],
    resamples: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """`statistic` of the models' accuracies on each of `resamples` paired draws.

    `correct[name]`: `(seeds, questions)` booleans, the same questions and seeds in the same order for every model.
    Each draw picks seeds and questions with replacement, once for all models.
    """
    shapes = {array.shape for array in correct.values()}
    if len(shapes) != 1:
        raise ValueError(f"Paired statistics need the same seeds and questions for every model, got shapes {shapes}.")
    num_seeds, num_questions = shapes.pop()
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for index in range(resamples):
        seeds = rng.integers(num_seeds, size=num_seeds)
        questions = rng.integers(num_questions, size=num_questions)
        accuracy = {name: float(array[np.ix_(seeds, questions)].mean()) for name, array in correct.items()}
        values[index] = statistic(accuracy)
    return values


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the defined (non-NaN) values; NaNs where none is."""
    defined = values[~np.isnan(values)]
    if not len(defined):
        return math.nan, math.nan
    tail = (1 - confidence) / 2
    low, high = np.quantile(defined, [tail, 1 - tail])
    return float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test: the probability of a split at least this uneven if either model were as likely as
    the other to be the one right on a pair they disagree on."""
    pairs = wins + losses
    if pairs == 0:
        return 1.0
    extreme = max(wins, losses)
    tail = sum(math.comb(pairs, count) for count in range(extreme, pairs + 1)) / 2**pairs
    return min(1.0, 2 * tail)


def disagreements(correct: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """Question-seed pairs that `correct` gets right and `reference` wrong, and the other way round."""
    return int((correct & ~reference).sum()), int((~correct & reference).sum())
