"""The main job: pooling baseline vs Vision Remember on the synthetic fine-grained task, per ratio and seed.

The vision tower is pretrained once and frozen; then every (ratio, seed, with or without Vision Remember) model is
trained in its own worker process, one thread each, so two models train at once on a two-core machine.
"""

import json
import multiprocessing
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import experiment
from .decoders import build_model, smollm2_folder
from .tasks import QUESTIONS, make_split
from .tower import pretrain_tower


TOWER_SEED, TEST_SEED = 10_000, 20_000


@dataclass
class Settings:
    ratios: list[int] = field(default_factory=lambda: [3])  # downsample factors s: ratio 1/s**2
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 2500
    learning_rate: float = 1e-3
    batch_size: int = 32
    train_size: int = 4000
    test_size: int = 400
    tower_steps: int = 400
    workers: int = 2
    decoder: str = "tiny"
    output_dir: str = "outputs/vr-hf"


@dataclass
class Job:
    downsample_factor: int
    use_vision_remember: bool
    seed: int
    save_to: str | None = None

    @property
    def name(self) -> str:
        variant = "vision-remember" if self.use_vision_remember else "baseline"
        return f"1/{self.downsample_factor**2} {variant} seed {self.seed}"


class StepReporter(TrainerCallback):
    def __init__(self, queue):
        self.queue = queue

    def on_step_end(self, args, state, control, **kwargs):
        self.queue.put(1)


def run_job(job: Job, settings: Settings, tower_dir: str, queue) -> dict:
    """Train and evaluate one model; runs in a worker process."""
    torch.set_num_threads(1)
    scratch = os.path.join(settings.output_dir, "runs", job.name.replace("/", "-").replace(" ", "-"))
    model, processor = build_model(
        settings.decoder, tower_dir, job.downsample_factor, job.use_vision_remember, job.seed, scratch
    )
    train = experiment.AnswerDataset(make_split(settings.train_size, seed=job.seed), processor)
    run = experiment.RunSettings(settings.steps, settings.batch_size, settings.learning_rate, job.seed)
    experiment.train(model, train, run, scratch, processor.tokenizer.pad_token_id, [StepReporter(queue)])
    accuracy = experiment.accuracy_by_task(model, processor, make_split(settings.test_size, seed=TEST_SEED))
    if job.save_to:
        model.save_pretrained(job.save_to)
        processor.save_pretrained(job.save_to)
    return {**asdict(job), "accuracy": accuracy}


def jobs_for(settings: Settings) -> list[Job]:
    checkpoint = os.path.join(settings.output_dir, "checkpoint")
    jobs = []
    for ratio in settings.ratios:
        for seed in settings.seeds:
            jobs.append(Job(ratio, False, seed))
            first = ratio == settings.ratios[0] and seed == settings.seeds[0]
            jobs.append(Job(ratio, True, seed, save_to=checkpoint if first else None))
    return jobs


def follow_progress(queue, total: int) -> threading.Thread:
    def update():
        with tqdm(total=total, desc="training steps, all models") as bar:
            for _ in range(total):
                queue.get()
                bar.update()

    thread = threading.Thread(target=update, daemon=True)
    thread.start()
    return thread


def run(settings: Settings) -> list[dict]:
    """Pretrain the tower, train every model, return one result per model."""
    if settings.decoder == "smollm2":
        smollm2_folder()  # fail now, not after pretraining the tower
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    print(f"Pretraining the vision tower on patch classification ({settings.tower_steps} steps)...")
    tower, patch_accuracy = pretrain_tower(
        make_split(2000, seed=TOWER_SEED),
        make_split(200, seed=TOWER_SEED + 1),
        settings.tower_steps,
        os.path.join(settings.output_dir, "runs", "tower"),
    )
    print(f"Tower patch accuracy on held-out images: {patch_accuracy:.1%}; it is frozen from here on.")
    tower_dir = os.path.join(settings.output_dir, "runs", "tower", "pretrained")
    tower.save_pretrained(tower_dir)

    jobs = jobs_for(settings)
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        queue = manager.Queue()
        progress = follow_progress(queue, settings.steps * len(jobs))
        with context.Pool(settings.workers) as pool:
            pending = [pool.apply_async(run_job, (job, settings, tower_dir, queue)) for job in jobs]
            results = [task.get() for task in pending]
            pool.close()  # workers exit on their own: terminate() skips their finalizers and leaks their semaphores
            pool.join()
        progress.join(timeout=5)
    for result in results:
        result["patch_accuracy"] = patch_accuracy
    return results


def summary(results: list[dict]) -> dict:
    """Mean and spread over seeds of each (ratio, task, variant) accuracy, in points."""
    table = {}
    for ratio in sorted({result["downsample_factor"] for result in results}):
        for task in [*QUESTIONS, "average"]:
            row = {}
            for variant, remember in (("baseline", False), ("vision_remember", True)):
                scores = [
                    100 * score(result["accuracy"], task)
                    for result in results
                    if result["downsample_factor"] == ratio and result["use_vision_remember"] == remember
                ]
                row[variant] = experiment.mean_and_spread(scores)
            row["gain"] = row["vision_remember"][0] - row["baseline"][0]
            table[(ratio, task)] = row
    return table


def score(accuracy: dict[str, float], task: str) -> float:
    return sum(accuracy.values()) / len(accuracy) if task == "average" else accuracy[task]


def format_table(table: dict, num_seeds: int) -> str:
    lines = [
        f"Held-out accuracy (%), mean ± std over {num_seeds} seed(s)",
        f"{'ratio':<7}{'task':<9}{'baseline':>14}{'+ Vision Remember':>20}{'gain':>9}",
    ]
    for (ratio, task), row in table.items():
        baseline, remember = row["baseline"], row["vision_remember"]
        lines.append(
            f"{'1/' + str(ratio**2):<7}{task:<9}{baseline[0]:>8.1f} ± {baseline[1]:<4.1f}"
            f"{remember[0]:>14.1f} ± {remember[1]:<4.1f}{row['gain']:>+8.1f}"
        )
    return "\n".join(lines)


def plot(table: dict, path: str):
    from matplotlib import pyplot as plt

    ratios = sorted({ratio for ratio, _ in table})
    figure, axes = plt.subplots(1, len(ratios), figsize=(4 * len(ratios), 3.2), squeeze=False, sharey=True)
    tasks = [*QUESTIONS, "average"]
    for axis, ratio in zip(axes[0], ratios):
        for offset, (variant, label) in enumerate((("baseline", "pooling"), ("vision_remember", "+ Vision Remember"))):
            means = [table[(ratio, task)][variant][0] for task in tasks]
            spreads = [table[(ratio, task)][variant][1] for task in tasks]
            positions = [index + (offset - 0.5) * 0.38 for index in range(len(tasks))]
            axis.bar(positions, means, width=0.38, yerr=spreads, label=label, capsize=3)
        axis.set_xticks(range(len(tasks)), tasks)
        axis.set_title(f"compression 1/{ratio**2}")
        axis.set_ylim(0, 105)
    axes[0][0].set_ylabel("held-out accuracy (%)")
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.92))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_results(results: list[dict], settings: Settings) -> str:
    table = summary(results)
    text = format_table(table, len(settings.seeds))
    output = Path(settings.output_dir)
    (output / "results.json").write_text(json.dumps({"settings": asdict(settings), "runs": results}, indent=2))
    (output / "results.md").write_text(text + "\n")
    plot(table, str(output / "results.png"))
    return text
