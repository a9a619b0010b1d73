"""The runner of `vr-hf`: every model the requested tables need, per seed, then their tables.

The vision tower is pretrained once and frozen; then every (model, seed) is trained in its own worker process, one
thread each, so two models train at once on a two-core machine. Models trained with the same seed see the same
training data in the same order and start from the same weights wherever they share parts.
"""

import functools
import json
import multiprocessing
import os
import threading
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import experiment, tables, tuning
from .decoders import build_model, smollm2_folder
from .settings import Settings
from .tasks import FAMILIES, make_split
from .tower import pretrain_tower


TOWER_SEED, TEST_SEED = 10_000, 20_000


@dataclass
class Job:
    model: tables.Model
    seed: int
    save_to: str | None = None
    learning_rate: float | None = None  # one rate of the sweep; None: the settings' rate, untuned

    @property
    def name(self) -> str:
        swept = "" if self.learning_rate is None else f" lr {self.learning_rate:g}"
        return f"{self.model.name} seed {self.seed}{swept}"


class StepReporter(TrainerCallback):
    def __init__(self, queue):
        self.queue = queue

    def on_step_end(self, args, state, control, **kwargs):
        self.queue.put(1)


def job_folder(job: Job, settings: Settings) -> Path:
    return Path(settings.output_dir, "runs", job.name.replace("/", "-").replace(" ", "-"))


def training_settings(settings: Settings) -> dict:
    """What a model's result depends on: a finished job is reused only where all of it is unchanged."""
    ignored = ("tables", "ratios", "seeds", "sweep", "workers", "output_dir")
    return {key: value for key, value in asdict(settings).items() if key not in ignored}


def finished_result(job: Job, settings: Settings) -> dict | None:
    path = job_folder(job, settings) / "result.json"
    if job.save_to or not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result["training_settings"] == training_settings(settings) else None


def in_worker(function):
    """A worker's exception travels back pickled, and one whose class cannot be rebuilt from its arguments would hang
    the pool: it comes back as a RuntimeError that carries the worker's traceback."""

    @functools.wraps(function)
    def run(*args):
        try:
            return function(*args)
        except Exception:
            raise RuntimeError(f"in a worker process:\n{traceback.format_exc()}") from None

    return run


def warm_start_chain(side: int) -> list[int]:
    """The window sides of the warm-start stages a model at window side `side` starts from, in training order: the
    uncompressed model, then the pooling baseline at every smaller window, each stage from the one before. A
    compressed model trained from the uncompressed one learns at 1/4 but falls to the answer prior at 1/9 and 1/16;
    one step of compression at a time, each ratio's baselines learn (docs/results/README.md)."""
    return list(range(1, max(side, 2)))


def warm_start_folder(seed: int, side: int, settings: Settings) -> Path:
    return Path(settings.output_dir, "runs", f"warm-start-1-{side**2}-seed-{seed}")


def start_model(model: tables.Model, seed: int, settings: Settings, tower_dir: str, scratch: Path):
    """`model` built for `seed`, from its warm start where `settings` asks for one, and its processor."""
    built, processor = build_model(
        settings.decoder, tower_dir, model.downsample_factor, model.config_overrides, seed, str(scratch)
    )
    if settings.warm_start_steps:
        start = warm_start_chain(model.downsample_factor)[-1]
        load_warm_start(built, load_file(warm_start_folder(seed, start, settings) / "model.safetensors"))
    return built, processor


def train_started(model, processor, seed: int, steps: int, settings: Settings, scratch: Path, callbacks=()):
    """Train a started model `steps` steps on the training split of `seed`; returns its training curve."""
    train = experiment.AnswerDataset(make_split(settings.train_size, seed, settings.task), processor)
    run = experiment.RunSettings(steps, settings.batch_size, settings.learning_rate, seed)
    return experiment.train(model, train, run, str(scratch), processor.tokenizer.pad_token_id, list(callbacks))


def train_model(
    model: tables.Model, seed: int, steps: int, settings: Settings, tower_dir: str, scratch: Path, callbacks=()
):
    """`start_model`, then `train_started`: the trained model, its processor and its training curve."""
    built, processor = start_model(model, seed, settings, tower_dir, scratch)
    return built, processor, train_started(built, processor, seed, steps, settings, scratch, callbacks)


def load_warm_start(model, state: dict):
    """Every weight of `model` that the warm start's `state` has, by name and shape; the others (Vision Remember's
    blocks, a projector of another kind) keep their initialisation."""
    own = model.state_dict()
    matching = {name: tensor for name, tensor in state.items() if name in own and own[name].shape == tensor.shape}
    model.load_state_dict(matching, strict=False)


def finished_warm_start(seed: int, side: int, settings: Settings) -> bool:
    record = warm_start_folder(seed, side, settings) / "curve.json"
    return record.is_file() and json.loads(record.read_text())["training_settings"] == training_settings(settings)


def train_warm_starts(seed: int, sides: list[int], settings: Settings, tower_dir: str, callbacks=()):
    """Train the warm-start stages of `seed` at window sides `sides` (a `warm_start_chain`) that are not finished yet,
    `warm_start_steps` each, each from the one before; each is kept with its training curve."""
    for side in sides:
        if finished_warm_start(seed, side, settings):
            continue
        folder = warm_start_folder(seed, side, settings)
        stage = replace(settings, warm_start_steps=0) if side == 1 else settings
        model, _, curve = train_model(
            tables.Model(side), seed, settings.warm_start_steps, stage, tower_dir, folder, callbacks
        )
        save_file({name: tensor.clone() for name, tensor in model.state_dict().items()}, folder / "model.safetensors")
        record = {"training_settings": training_settings(settings), "training_curve": curve}
        (folder / "curve.json").write_text(json.dumps(record))


@in_worker
def run_warm_starts(seed: int, sides: list[int], settings: Settings, tower_dir: str, queue):
    """`train_warm_starts` in a worker process."""
    torch.set_num_threads(1)
    train_warm_starts(seed, sides, settings, tower_dir, [StepReporter(queue)])


@in_worker
def run_job(job: Job, settings: Settings, tower_dir: str, queue) -> dict:
    """Train and evaluate one model, and keep its result beside it; runs in a worker process."""
    torch.set_num_threads(1)
    folder = job_folder(job, settings)
    learning_rate = settings.learning_rate if job.learning_rate is None else job.learning_rate
    model, processor, curve = train_model(
        job.model,
        job.seed,
        settings.steps,
        replace(settings, learning_rate=learning_rate),  # the warm-start chain's rate stays the settings'
        tower_dir,
        folder,
        [StepReporter(queue)],
    )
    correct = experiment.correct_by_task(model, processor, held_out_split(settings), questions(settings))
    if job.save_to:
        model.save_pretrained(job.save_to)
        processor.save_pretrained(job.save_to)
    accuracy = {task: sum(hits) / len(hits) for task, hits in correct.items()}
    result = {"model": asdict(job.model), "seed": job.seed, "accuracy": accuracy, "correct": correct}
    result.update(training_settings=training_settings(settings), learning_rate=learning_rate, training_curve=curve)
    if job.learning_rate is not None:
        validation = experiment.correct_by_task(
            model, processor, tuning.validation_split(settings), questions(settings)
        )
        result["validation_accuracy"] = experiment.accuracy(validation)
    (folder / "result.json").write_text(json.dumps(result))
    return result


def questions(settings: Settings) -> dict[str, str]:
    return FAMILIES[settings.task].questions


def held_out_split(settings: Settings):
    return make_split(settings.test_size, TEST_SEED, settings.task)


def jobs_for(settings: Settings) -> list[Job]:
    """One job per model and seed (per learning rate of a sweep), each once however many tables need it, table by
    table and a table's first seed first (so that a stopped run leaves whole tables and seeds to resume from); the main
    table's first Vision Remember model is saved as the checkpoint."""
    pairs = {}
    for table in requested_tables(settings):
        pairs.update(dict.fromkeys((model, seed) for seed in settings.seeds for model in table.models()))
    rates = settings.sweep or [None]
    jobs = [Job(model, seed, learning_rate=rate) for model, seed in pairs for rate in rates]
    if "main" in settings.tables:
        first = tables.Model(settings.ratios[0], "vision-remember")
        next(job for job in jobs if job.model == first).save_to = os.path.join(settings.output_dir, "checkpoint")
    return jobs


def requested_tables(settings: Settings) -> list[tables.Table]:
    return tables.tables(settings.tables, settings.ratios)


def warm_start_sides(jobs: list[Job], settings: Settings) -> list[int]:
    """The window sides of the warm-start stages that `jobs` start from: the longest chain they need."""
    if not settings.warm_start_steps or not jobs:
        return []
    return warm_start_chain(max(job.model.downsample_factor for job in jobs))


def follow_progress(queue, total: int) -> threading.Thread:
    def update():
        with tqdm(total=total, desc="training steps, all models") as bar:
            for _ in range(total):
                queue.get()
                bar.update()

    thread = threading.Thread(target=update, daemon=True)
    thread.start()
    return thread


def report(result: dict):
    name = tables.Model(**result["model"]).name
    swept = f" at learning rate {result['learning_rate']:g}" if "validation_accuracy" in result else ""
    share = experiment.accuracy(result["correct"])
    tqdm.write(f"{name} seed {result['seed']}{swept}: {share:.1%} of held-out questions answered right")


def run(settings: Settings) -> list[dict]:
    """Pretrain the tower, train every model, return one result per model and seed."""
    if settings.decoder == "smollm2":
        smollm2_folder()  # fail now, not after pretraining the tower
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    print(f"Pretraining the vision tower on patch classification ({settings.tower_steps} steps)...")
    tower, patch_accuracy = pretrain_tower(
        make_split(2000, TOWER_SEED, settings.task),
        make_split(200, TOWER_SEED + 1, settings.task),
        settings.tower_steps,
        os.path.join(settings.output_dir, "runs", "tower"),
        learn_columns=FAMILIES[settings.task].tower_learns_columns,
    )
    print(f"Tower patch accuracy on held-out images: {patch_accuracy:.1%}; it is frozen from here on.")
    tower_dir = os.path.join(settings.output_dir, "runs", "tower", "pretrained")
    tower.save_pretrained(tower_dir)

    jobs = jobs_for(settings)
    finished = {job.name: result for job in jobs if (result := finished_result(job, settings))}
    if finished:
        print(f"Reusing {len(finished)} models already trained with these settings in {settings.output_dir}/runs")
    jobs = [job for job in jobs if job.name not in finished]
    sides = warm_start_sides(jobs, settings)
    stages = [
        (seed, side) for seed in settings.seeds for side in sides if not finished_warm_start(seed, side, settings)
    ]
    if stages:
        names = ", ".join(f"1/{side**2}" for side in sides)
        print(f"Warm starts: per seed, {settings.warm_start_steps} steps at {names}, each from the one before")
    print(f"Training {len(jobs)} models, {settings.workers} at a time...")
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue()
        progress = follow_progress(queue, settings.steps * len(jobs) + settings.warm_start_steps * len(stages))
        with context.Pool(settings.workers) as pool:
            if stages:
                pool.starmap(run_warm_starts, [(seed, sides, settings, tower_dir, queue) for seed in settings.seeds])
            pending = [pool.apply_async(run_job, (job, settings, tower_dir, queue), callback=report) for job in jobs]
            results = [*finished.values()] + [task.get() for task in pending]
            pool.close()  # workers exit on their own: terminate() skips their finalizers and leaks their semaphores
            pool.join()
        progress.join(timeout=5)
    for result in results:
        result["patch_accuracy"] = patch_accuracy
    return tuning.choose(results, settings.sweep) if settings.sweep else results


def write_results(results: list[dict], settings: Settings) -> str:
    """Each requested table as Markdown (printed and `<table>.md`), a plot (`<table>.png`) and raw JSON
    (`<table>.json`: the settings, every run's per-question answers and the summary)."""
    test = held_out_split(settings)
    prior_by_task = experiment.answer_prior(test, questions(settings))
    prior = sum(prior_by_task.values()) / len(prior_by_task)
    output, texts = Path(settings.output_dir), []
    for table in requested_tables(settings):
        summary = tables.summarize(table, results, settings.seeds)
        runs = [result for result in results if tables.Model(**result["model"]) in table.models()]
        text = tables.format_table(table, summary, settings.seeds, prior, len(test))
        text += "\n\n" + tuning.summary(runs, settings.sweep)
        record = {"settings": asdict(settings), "answer_prior": prior_by_task, "summary": summary, "runs": runs}
        if settings.warm_start_steps:
            record["warm_starts"] = {
                f"1/{side**2} seed {seed}": json.loads(
                    (warm_start_folder(seed, side, settings) / "curve.json").read_text()
                )["training_curve"]
                for seed in settings.seeds
                for side in warm_start_chain(max(model.downsample_factor for model in table.models()))
            }
        (output / f"{table.name}.json").write_text(json.dumps(record, indent=2))
        (output / f"{table.name}.md").write_text(text + "\n")
        tables.plot(table, summary, prior, str(output / f"{table.name}.png"))
        texts.append(text)
    return "\n\n".join(texts)
