"""`vr-hf evaluate`: evaluate a vr-hf checkpoint with lmms-eval and print the table; `vr-hf paper-table`: the paper's
Table 1 from the results file of an `lmms-eval` run."""

import argparse
import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

from huggingface_hub import constants

from ..checkpoints import resolve_source
from . import TASKS_DIR, paper


OFFLINE_GROUP = "vr_hf_offline"
INSTALL = 'pip install -c constraints.txt ".[eval]" && pip install --no-deps lmms-eval==0.7.3'
EXAMPLES = f"""examples:
  vr-hf evaluate outputs/vr-hf/checkpoint                  the offline tasks ({OFFLINE_GROUP}), no downloads
  vr-hf evaluate outputs/vr-hf/checkpoint --tasks vr_hf_red_letter --limit 20
  vr-hf evaluate CHECKPOINT --paper --dtype bfloat16 --batch-size 8    the paper's 11 benchmarks (Hub, GPU)
  vr-hf paper-table runs/paper/*/*_results.json           Table 1 from lmms-eval --output_path runs/paper

needs lmms-eval: {INSTALL}
"""


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="vr-hf evaluate",
        description="Evaluate a vr-hf checkpoint with lmms-eval (--model vr_hf) and print the results table.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "checkpoint", help="folder (or Hub id) of a vr-hf checkpoint: LLaVA-VR, or a graft (vr_hf.backbones)"
    )
    suite = parser.add_mutually_exclusive_group()
    suite.add_argument("--tasks", nargs="+", help=f"lmms-eval task names (default: the group {OFFLINE_GROUP})")
    suite.add_argument("--paper", action="store_true", help="the paper's 11 benchmarks; needs Hub access")
    parser.add_argument("--limit", type=int, help="evaluate only the first LIMIT questions of each task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--device", help="default: cuda where there is one, else cpu")
    parser.add_argument("--attn-implementation", help="eager, sdpa, flash_attention_2...")
    parser.add_argument("--output-dir", default="outputs/vr-hf-eval", help="where results.json and table.md go")
    arguments = parser.parse_args(argv)
    if arguments.limit is not None and arguments.limit < 1:
        parser.error("--limit must be 1 or more")
    try:
        resolve_source(arguments.checkpoint, "the checkpoint", hub_needs_owner=True)
    except FileNotFoundError as error:
        parser.error(str(error))
    return arguments


def require_lmms_eval():
    if importlib.util.find_spec("lmms_eval") is None:
        raise SystemExit(f"vr-hf evaluate runs lmms-eval, which is not installed: {INSTALL}")


def evaluate(argv=None) -> dict:
    arguments = parse_arguments(argv)
    require_lmms_eval()
    if arguments.paper and constants.HF_HUB_OFFLINE:
        raise SystemExit("--paper downloads the benchmarks' data from the Hub, and HF_HUB_OFFLINE is set: unset it.")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from .lmms_model import VisionRememberLMMS

    task_manager = TaskManager(include_path=TASKS_DIR, include_defaults=arguments.paper or bool(arguments.tasks))
    tasks = paper.TASKS if arguments.paper else arguments.tasks or [OFFLINE_GROUP]
    unknown = [task for task in tasks if task not in task_manager.all_tasks]
    if unknown:
        raise SystemExit(f"Unknown lmms-eval tasks {unknown}: `lmms-eval --tasks list` lists them.")
    try:
        model = VisionRememberLMMS(
            arguments.checkpoint,
            dtype=arguments.dtype,
            device=arguments.device,
            attn_implementation=arguments.attn_implementation,
            batch_size=arguments.batch_size,
        )
    except ValueError as error:  # the model's own checks: each says what is wrong and what to do
        raise SystemExit(f"vr-hf evaluate: {error}") from None
    results = simple_evaluate(model=model, tasks=tasks, limit=arguments.limit, task_manager=task_manager)
    text = paper.table({arguments.checkpoint: results}) if arguments.paper else offline_table(results)
    write(results, text, arguments.output_dir)
    print(f"\n{arguments.checkpoint}\n{text}\n\nResults and table in {arguments.output_dir}/ (results.json, table.md)")
    return results


def offline_table(results: dict) -> str:
    """Score per task beside its answer prior (always giving the most frequent answer) and its number of questions."""
    lines = [f"{'task':<26}{'metric':<13}{'score (%)':>10}{'answer prior (%)':>18}{'questions':>11}"]
    for task in sorted(results["samples"]):
        scores = results["results"][task]
        metric = next(key for key in scores if key.endswith(",none") and "_stderr" not in key)
        targets = Counter(str(sample["target"]) for sample in results["samples"][task])
        prior = max(targets.values()) / sum(targets.values())
        name = metric.split(",")[0]
        lines.append(
            f"{task:<26}{name:<13}{100 * scores[metric]:>10.1f}{100 * prior:>18.1f}{sum(targets.values()):>11}"
        )
    return "\n".join(lines)


def write(results: dict, text: str, output_dir: str):
    from lmms_eval.utils import handle_non_serializable

    os.makedirs(output_dir, exist_ok=True)
    saved = {key: value for key, value in results.items() if key != "samples"}
    Path(output_dir, "results.json").write_text(json.dumps(saved, indent=2, default=handle_non_serializable))
    Path(output_dir, "table.md").write_text(text + "\n")


def paper_table(argv=None) -> str:
    parser = argparse.ArgumentParser(
        prog="vr-hf paper-table", description="Print the paper's Table 1 from lmms-eval results files."
    )
    parser.add_argument("results", nargs="+", help="results JSON files written by lmms-eval --output_path")
    parser.add_argument("--names", nargs="+", help="row names (default: each file's model_args pretrained=)")
    arguments = parser.parse_args(argv)
    if arguments.names and len(arguments.names) != len(arguments.results):
        parser.error(f"{len(arguments.results)} results files but {len(arguments.names)} --names")
    missing = [path for path in arguments.results if not Path(path).is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    runs = {}
    for index, path in enumerate(arguments.results):
        results = json.loads(Path(path).read_text())
        runs[arguments.names[index] if arguments.names else row_name(results, path)] = results
    text = paper.table(runs)
    print(text)
    return text


def row_name(results: dict, path: str) -> str:
    model_args = str(results.get("config", {}).get("model_args", ""))
    pretrained = [
        value for key, _, value in (arg.partition("=") for arg in model_args.split(",")) if key == "pretrained"
    ]
    return pretrained[0] if pretrained else path
