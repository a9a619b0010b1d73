"""The tables of `vr-hf --table 2 / 5`: the models they train, and their statistics against hand-computed values."""

import math

import numpy as np
import pytest

from vr_hf.cli import parse_arguments
from vr_hf.demo import decoders, statistics, tables
from vr_hf.demo.compare import jobs_for
from vr_hf.demo.settings import Settings
from vr_hf.demo.tower import tower_config


def test_fraction_recovered_is_the_share_of_the_compression_loss_given_back():
    assert statistics.fraction_recovered(ceiling=90, baseline=50, remember=70) == 0.5
    assert statistics.fraction_recovered(ceiling=90, baseline=50, remember=40) == -0.25
    assert math.isnan(statistics.fraction_recovered(ceiling=50, baseline=50, remember=60))


def test_sign_test_is_exact():
    assert statistics.sign_test(5, 0) == pytest.approx(2 / 32)
    assert statistics.sign_test(0, 5) == pytest.approx(2 / 32)
    assert statistics.sign_test(3, 3) == 1.0
    assert statistics.sign_test(0, 0) == 1.0
    assert statistics.sign_test(9, 1) == pytest.approx(2 * 11 / 1024)


def test_the_bootstrap_draws_the_same_questions_for_every_model():
    rng = np.random.default_rng(0)
    baseline = rng.random((3, 200)) < 0.5
    same = {"model": baseline.copy(), "baseline": baseline}
    assert statistics.interval(statistics.bootstrap(same, tables.gain)) == (0.0, 0.0)
    better = {"model": baseline | (rng.random((3, 200)) < 0.5), "baseline": baseline}
    low, high = statistics.interval(statistics.bootstrap(better, tables.gain))
    assert 0 < low < better["model"].mean() - baseline.mean() < high


def synthetic_results(row: tables.Row, seeds: list[int], accuracies: dict[str, float], questions: int = 100):
    """Per-question answers with exactly the given accuracy per model, the first questions right."""
    results = []
    for name, model in (("ceiling", row.ceiling), ("baseline", row.baseline), ("model", row.model)):
        right = int(accuracies[name] * questions)
        hits = [index < right for index in range(questions)]
        for seed in seeds:
            correct = {"text": hits[: questions // 2], "chart": hits[questions // 2 :]}
            results.append(
                {
                    "model": {"downsample_factor": model.downsample_factor, "variant": model.variant},
                    "seed": seed,
                    "correct": correct,
                }
            )
    return results


def test_a_row_reports_gain_recovered_and_a_paired_test():
    row = tables.Row("1/9", tables.Model(3, "vision-remember"), tables.CEILING)
    results = synthetic_results(row, [0, 1], {"ceiling": 0.9, "baseline": 0.5, "model": 0.7})
    summary = tables.summarize_row(row, results, [0, 1])
    assert summary["accuracy"] == pytest.approx({"ceiling": 90.0, "baseline": 50.0, "model": 70.0})
    assert summary["gain"] == pytest.approx(20.0)
    assert summary["recovered"] == pytest.approx(0.5)
    low, high = summary["recovered_interval"]
    assert low <= 0.5 <= high
    # the model is right on 20 questions per seed where the baseline is wrong, and never the other way round
    assert summary["sign_test_p"] == pytest.approx(statistics.sign_test(40, 0))


def test_tables_train_each_model_once_per_seed():
    jobs = jobs_for(Settings(tables=["2", "3", "4", "5"], seeds=[0, 1, 2]))
    models = {job.model for job in jobs}
    assert len(jobs) == len(models) * 3 == len({(job.model, job.seed) for job in jobs})
    ratios = {model.downsample_factor for model in models}
    assert ratios == {1, 2, 3, 4}, "the ceiling and the three ratios"
    assert {model.variant for model in models} == set(tables.VARIANTS) - {"pixel shuffle"}
    assert all(job.save_to is None for job in jobs), "only the main table saves a checkpoint"


def test_every_table_variant_builds_the_model_its_name_says():
    expected = {  # (use_vision_remember, multi_level, bidirectional, text_guidance, interaction[, refusion])
        "baseline": (False, True, True, True, "local"),
        "vision-remember": (True, True, True, True, "local"),
        "local attention": (True, False, False, False, "local"),
        "+ multi-level": (True, True, False, False, "local"),
        "+ bidirectional": (True, True, True, False, "local"),
        "deformable": (True, True, True, True, "deformable"),
        "global": (True, True, True, True, "global"),
        "deepstack": (True, True, True, True, "local", "deepstack"),
        "sva": (True, True, True, True, "local", "sva"),
        "tokenpacker": (False, True, True, True, "local", "tokenpacker"),
        "fastv": (False, True, True, True, "local", "fastv from layer 1 keeps 1/9"),
        "pixel shuffle": (False, True, True, True, "local", "pixel_shuffle"),
    }
    assert set(expected) == set(tables.VARIANTS)
    for name, settings in expected.items():
        config = decoders.tiny_model_config(tower_config(), 3, tables.Model(3, name).config_overrides)
        built = (config.use_vision_remember, config.multi_level, config.bidirectional, config.text_guidance)
        refusion = () if config.refusion == "vision_remember" else (config.refusion,)
        projector = () if config.projector_type == "avg_pool" else (config.projector_type,)
        fastv = (
            ()
            if config.fastv_layer is None
            else (f"fastv from layer {config.fastv_layer} keeps 1/{round(1 / config.fastv_keep_ratio)}",)
        )
        assert (*built, config.interaction, *refusion, *projector, *fastv) == settings, name
        pooling = 1 if name == "fastv" else 3
        assert (config.downsample_factor, config.remember_after_layers) == (pooling, [0]), name


def test_table_options_default_to_the_graded_task_and_three_seeds():
    tables_settings = parse_arguments(["--table", "2", "5"])
    assert (tables_settings.task, tables_settings.seeds, tables_settings.steps) == ("word", [0, 1, 2], 1000)
    assert tables_settings.warm_start_steps == 400 and parse_arguments([]).warm_start_steps == 0
    changed = parse_arguments(["--table", "5", "--seeds", "4", "--task", "red", "--steps", "7"])
    assert (changed.task, changed.seeds, changed.steps) == ("red", [4], 7)
    default = parse_arguments([])
    assert (default.tables, default.task, default.seeds, default.ratios, default.steps) == (
        ["main"],
        "red",
        [0],
        [3],
        Settings().steps,
    )
    with pytest.raises(SystemExit):
        parse_arguments(["--table", "main", "2"])


@pytest.mark.parametrize("with_ceiling", [False, True])
def test_the_markdown_table_has_one_cell_per_column(with_ceiling):
    row = tables.Row("1/9", tables.Model(3, "vision-remember"), tables.CEILING if with_ceiling else None)
    table = tables.Table("t", "T", {"": [row]})
    results = synthetic_results(
        tables.Row("1/9", row.model, tables.CEILING), [0, 1], {"ceiling": 1, "baseline": 0.5, "model": 0.7}
    )
    text = tables.format_table(table, tables.summarize(table, results, [0, 1]), [0, 1], prior=0.1, questions=100)
    header, rule, line = text.splitlines()[2:]
    assert header.count("|") == rule.count("|") == line.count("|") == 6 + with_ceiling * 2
    assert ("ceiling" in header) == with_ceiling and line.startswith("| 1/9 |")
