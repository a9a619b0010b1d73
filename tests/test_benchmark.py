"""benchmarks/: the statistics behind its ratios, and one whole regime on a tiny model, tables and plot included
(what it measures is never asserted: timings belong to the benchmark, not to tests)."""

import sys
from pathlib import Path

import pytest
import torch

from vr_hf.tiny import tiny_config


sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

import benchmark  # noqa: E402
import measure  # noqa: E402


def test_bootstrap_interval_brackets_the_median():
    values = [1.0, 1.2, 0.9, 1.1, 1.05, 0.95, 1.3, 1.0]
    interval = measure.bootstrap_interval(values)
    assert min(values) <= interval.low <= interval.median <= interval.high <= max(values)
    assert interval.median == pytest.approx(1.025)
    assert measure.bootstrap_interval([2.0] * 5).__dict__ == dict(median=2.0, low=2.0, high=2.0)


def test_paired_rounds_pair_each_round(monkeypatch):
    """Each round's ratio is of that round's two timings, whichever ran first (on a fake clock: a side's "seconds" are
    what it returns, ten times more each round, so a ratio across two rounds is off by ten)."""
    monkeypatch.setattr(measure, "wall_seconds", lambda function, device: function())
    calls = iter(range(1000))
    measured = measure.paired_rounds(
        lambda: 2.0 * 10 ** (next(calls) // 2), lambda: 1.0 * 10 ** (next(calls) // 2), torch.device("cpu"), 6
    )
    assert len(measured["first_s"]) == len(measured["second_s"]) == 6
    assert [a / b for a, b in zip(measured["first_s"], measured["second_s"])] == [2.0] * 6
    assert measured["ratio"] == dict(median=2.0, low=2.0, high=2.0)


@pytest.mark.parametrize(
    ("low", "high", "limit", "expected"),
    [(1.00, 1.02, 1.03, "met"), (1.04, 1.06, 1.03, "missed"), (1.01, 1.05, 1.03, "not resolved")],
)
def test_a_target_is_met_only_by_its_whole_interval(low, high, limit, expected):
    assert benchmark.verdict(dict(median=(low + high) / 2, low=low, high=high), limit).startswith(expected)


def test_one_regime_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreted kernel is far too slow to time
    config = tiny_config().to_diff_dict()
    config = {key: config[key] for key in ("vision_config", "text_config", "image_token_id", "cross_attention_heads")}
    config.update(vision_feature_layers=[1, 2, 3], remember_after_layers=[0, 2])
    config.update(image_grid_pinpoints=[[36, 72], [72, 36], [72, 72]])
    rounds = {"ttft": 2, "decode": 2, "train_step": 2}
    regime = benchmark.Regime("compute-bound", config, 72, 2, [1, 2, 3], rounds)
    setup = benchmark.Setup(torch.device("cpu"), torch.float32, [regime], decode_tokens=2, sizes="tiny")
    ceilings = measure.Ceilings(bandwidth=1e10, flops=1e10)
    profiles = []
    measured = benchmark.run_regime(setup, regime, "sdpa", ceilings, profiles)
    results = dict(device="cpu", dtype="float32", decode_tokens=2, regimes={regime.name: dict(measured, blocks=2)})
    table = "\n".join(benchmark.regime_table(regime.name, results["regimes"][regime.name]))
    targets = "\n".join(benchmark.targets_table(results))
    assert "| 1/9 |" in table and "1/9 local" in table and "1/4 global" in table
    assert "1/4 with VR at most 0.7x uncompressed TTFT" in targets and "prefill overhead" in targets
    assert len(profiles) == 2 and "1/9 +VR" in profiles[1]
    benchmark.plot(results, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 0
