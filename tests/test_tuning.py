"""The tables' tuning budget (`--sweep`): every model trains once per learning rate, a validation split of its own
chooses the rate per model and seed, and the tables report the chosen runs only."""

import json
import queue
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch
from transformers import SiglipVisionModel

from vr_hf.cli import main
from vr_hf.demo import compare, experiment, tables, tuning
from vr_hf.demo.settings import Settings
from vr_hf.demo.tower import tower_config


def swept_run(variant: str, seed: int, learning_rate: float, validation_accuracy: float) -> dict:
    model = asdict(tables.Model(3, variant))
    return dict(model=model, seed=seed, learning_rate=learning_rate, validation_accuracy=validation_accuracy)


def test_each_model_and_seed_keeps_the_rate_its_validation_accuracy_prefers():
    sweep = [3e-4, 1e-3, 3e-3]
    results = [
        swept_run("baseline", 0, 3e-4, 0.5),
        swept_run("baseline", 0, 1e-3, 0.7),
        swept_run("baseline", 0, 3e-3, 0.6),
        swept_run("baseline", 1, 3e-3, 0.9),  # a tie: the rate earlier in the sweep wins
        swept_run("baseline", 1, 1e-3, 0.9),
        swept_run("baseline", 1, 3e-4, 0.8),
        swept_run("vision-remember", 0, 1e-3, 0.1),
        swept_run("vision-remember", 0, 3e-3, 0.95),
        swept_run("vision-remember", 0, 3e-4, 0.2),
    ]
    chosen = {(run["model"]["variant"], run["seed"]): run for run in tuning.choose(results, sweep)}
    assert {key: run["learning_rate"] for key, run in chosen.items()} == {
        ("baseline", 0): 1e-3,
        ("baseline", 1): 1e-3,
        ("vision-remember", 0): 3e-3,
    }
    assert chosen["baseline", 0]["tuning"] == {"0.0003": 0.5, "0.001": 0.7, "0.003": 0.6}
    assert list(chosen["vision-remember", 0]["tuning"]) == ["0.0003", "0.001", "0.003"], "in the order of the rates"
    assert "chosen: 0.0003 0x, 0.001 2x, 0.003 1x" in tuning.summary(list(chosen.values()), sweep)


def test_a_sweep_trains_every_model_of_every_table_once_per_rate():
    untuned = compare.jobs_for(Settings(tables=["3"], seeds=[0, 1]))
    settings = Settings(tables=["3"], seeds=[0, 1], sweep=[1e-3, 3e-3])
    jobs = compare.jobs_for(settings)
    assert Counter((job.model, job.seed, job.learning_rate) for job in jobs) == Counter(
        (job.model, job.seed, rate) for job in untuned for rate in (1e-3, 3e-3)
    )
    assert len({compare.job_folder(job, settings) for job in jobs}) == len(jobs)
    assert compare.training_settings(settings) == compare.training_settings(Settings(tables=["3"], seeds=[0, 1]))


def test_a_swept_job_trains_at_its_own_rate_and_is_scored_on_a_split_of_its_own(tmp_path, monkeypatch):
    tower_dir = tmp_path / "tower"
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    settings = Settings(tables=["2"], task="word", sweep=[1e-3, 3e-3], train_size=4, test_size=8)
    settings.output_dir = str(tmp_path)
    validation = tuning.validation_split(settings)
    assert not any(
        np.array_equal(image.image, other.image) for image in validation for other in compare.held_out_split(settings)
    )
    trained_at = []

    def train(model, dataset, run, *rest):
        trained_at.append(run.learning_rate)
        return [[1, 0.0]]

    def score(model, processor, samples, questions, batch_size=64):
        on_validation = all(np.array_equal(a.image, b.image) for a, b in zip(samples, validation))
        return {task: [not on_validation] * 4 for task in questions}

    monkeypatch.setattr(experiment, "train", train)
    monkeypatch.setattr(experiment, "correct_by_task", score)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    job = compare.Job(tables.Model(3), 0, learning_rate=3e-3)
    compare.job_folder(job, settings).mkdir(parents=True)
    result = compare.run_job(job, settings, str(tower_dir), queue.Queue())
    assert trained_at == [3e-3] and result["learning_rate"] == 3e-3
    assert result["accuracy"] == {"which": 1.0, "column": 1.0} and result["validation_accuracy"] == 0.0


def test_a_swept_table_reports_the_chosen_runs_and_its_budget(tmp_path, capsys):
    output = tmp_path / "swept"
    arguments = ["--table", "3", "--seeds", "0", "--steps", "1", "--train-size", "4", "--test-size", "4"]
    arguments += ["--warm-start-steps", "1", "--tower-steps", "1", "--batch-size", "2", "--sweep", "1e-3", "3e-3"]
    main(arguments + ["--output-dir", str(output)])
    printed = capsys.readouterr().out
    assert "Tuning budget, every model and seed alike: learning rates 0.001, 0.003" in printed
    assert "1/9 baseline seed 0 at learning rate 0.003: " in printed
    record = json.loads((output / "table3.json").read_text())
    assert len(record["runs"]) == 5, "one run per model and seed: the chosen one"
    for run in record["runs"]:
        assert list(run["tuning"]) == ["0.001", "0.003"]
        assert run["validation_accuracy"] == max(run["tuning"].values())
    assert len(list((output / "runs").glob("1-9-baseline-seed-0-lr-*"))) == 2
    assert len(list((output / "runs").glob("warm-start-*"))) == 2, "one warm-start chain, whatever the sweep"

    main(arguments + ["--output-dir", str(output)])
    assert "Reusing 10 models" in capsys.readouterr().out


def test_a_split_s_accuracy_counts_every_question_of_every_type():
    assert experiment.accuracy({"which": [True, True, False], "column": [False]}) == 0.5
