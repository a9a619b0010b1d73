"""`vr-hf`: train a pooling baseline and the same model with Vision Remember on an offline fine-grained task."""

import argparse
import sys
import time
from fractions import Fraction

from .demo.settings import DECODERS, Settings
from .demo.tasks import FAMILIES


EXAMPLES = """examples:
  vr-hf                                    the default: ratio 1/9, one seed, about 9 minutes on 2 CPU cores
  vr-hf --ratios 1/4 1/9 1/16 --seeds 0 1 2
  vr-hf --table 2                          the paper's Table 2 in miniature: 1/4, 1/9, 1/16 and the ceiling, 3 seeds
  vr-hf --table 3                          its Table 3: Vision Remember vs DeepStack vs SVA at 1/9
  vr-hf --table 4                          its Table 4: Vision Remember vs FastV vs TokenPacker at 1/9
  vr-hf --table 5                          its Table 5a-b: components, interaction
  vr-hf --table 2 3 4 5                    all four, on the graded word task, sharing the models they have in common
  vr-hf --table 2 --sweep 3e-4 1e-3 3e-3   every model tuned alike: the learning rate a validation split picks
  vr-hf --decoder smollm2                  a real pretrained decoder (SmolLM2-135M-Instruct), frozen

serving with Transformers' own OpenAI-compatible server (vr-hf serve --help):
  vr-hf serve outputs/vr-hf/checkpoint     chat completions with images at http://localhost:8000/v1

evaluation with lmms-eval (vr-hf evaluate --help):
  vr-hf evaluate outputs/vr-hf/checkpoint  the saved checkpoint on the offline lmms-eval tasks
  vr-hf paper-table RESULTS.json           the paper's Table 1 from an lmms-eval run
"""


def downsample_factor(ratio: str) -> int:
    """'1/9' -> 3: the window side whose square is the compression."""
    value = Fraction(ratio)
    side = round(value.denominator**0.5)
    if value.numerator != 1 or side * side != value.denominator:
        raise argparse.ArgumentTypeError(f"ratio {ratio!r} is not 1/s² for a whole s: use 1/4, 1/9 or 1/16")
    if 12 % side:
        raise argparse.ArgumentTypeError(
            f"ratio {ratio} needs windows of side {side}, which do not tile 12x12 patches"
        )
    return side


# What the paper's tables (`--table 2 3 4 5`) change from the defaults: the graded task, three seeds, a shorter
# schedule (the graded task's models learn within it), and every model started from the same warm-start chain (without
# it, the compressed models sit at the answer prior: docs/results/README.md).
TABLE_DEFAULTS = dict(task="word", seeds=[0, 1, 2], steps=1000, warm_start_steps=400)


def parse_arguments(argv=None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="vr-hf", description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--table",
        dest="tables",
        nargs="+",
        choices=["main", "2", "3", "4", "5"],
        default=defaults.tables,
        help="main: baseline vs Vision Remember at --ratios (default); 2: the paper's Table 2 in miniature; "
        "3: its Table 3 (re-fusion methods); 4: its Table 4 (efficient-token methods); 5: its Table 5a-b. 2-5 default "
        "to --seeds 0 1 2",
    )
    parser.add_argument(
        "--ratios",
        nargs="+",
        type=downsample_factor,
        default=defaults.ratios,
        help="main table's compression ratios (default 1/9)",
    )
    parser.add_argument(
        "--task",
        choices=FAMILIES,
        help="red: name the red item of a full grid (default); word: name the red letter of three, or its column "
        "(default for --table 2-5)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds (default 0; 0 1 2 for --table 2-5)")
    parser.add_argument(
        "--steps",
        type=int,
        help=f"training steps per model (default {defaults.steps}; {TABLE_DEFAULTS['steps']} for --table 2-5)",
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=defaults.learning_rate,
        help="peak learning rate, cosine schedule (default %(default)s)",
    )
    parser.add_argument(
        "--sweep",
        nargs="+",
        type=float,
        default=defaults.sweep,
        metavar="LEARNING_RATE",
        help="the paper's tables only: train every model once per learning rate and keep, per model and seed, the "
        "one a validation split scores best (the warm-start chain stays at --learning-rate)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help="images per training step (default %(default)s)"
    )
    parser.add_argument(
        "--train-size", type=int, default=defaults.train_size, help="training images per model (default %(default)s)"
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=defaults.test_size,
        help="held-out images, one question each (default %(default)s)",
    )
    parser.add_argument(
        "--tower-steps",
        type=int,
        default=defaults.tower_steps,
        help="vision tower pretraining steps (default %(default)s)",
    )
    parser.add_argument(
        "--warm-start-steps",
        type=int,
        help="per seed, train the uncompressed model this many steps, then the pooling baseline at 1/4, at 1/9, each "
        "as many steps from the one before, and start each model from the stage before its ratio (default "
        f"{defaults.warm_start_steps}; {TABLE_DEFAULTS['warm_start_steps']} for --table 2-5)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="models trained at once, one core each (default %(default)s)",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        default=defaults.decoder,
        help="tiny: 2-layer Qwen2 trained from scratch (default); smollm2: pretrained SmolLM2-135M-Instruct, frozen "
        "(needs pip install 'vr-hf[smollm2]' and its weights: the error says how to fetch them)",
    )
    parser.add_argument(
        "--output-dir",
        default=defaults.output_dir,
        help="tables, plots, raw results, checkpoint (default %(default)s)",
    )
    arguments = vars(parser.parse_args(argv))
    if "main" in arguments["tables"] and len(arguments["tables"]) > 1:
        parser.error("--table main runs alone: ask for it, or for the paper's tables, in separate runs")
    if arguments["sweep"] and "main" in arguments["tables"]:
        parser.error("--sweep tunes the paper's tables (--table 2 3 4 5); the main table trains each model once")
    if len(set(arguments["sweep"])) != len(arguments["sweep"]) or any(rate <= 0 for rate in arguments["sweep"]):
        parser.error(
            f"--sweep {arguments['sweep']}: give distinct positive learning rates, for example 3e-4 1e-3 3e-3"
        )
    table_defaults = {} if arguments["tables"] == ["main"] else TABLE_DEFAULTS
    for name, value in arguments.items():
        if value is None:
            arguments[name] = table_defaults.get(name, getattr(defaults, name))
    return Settings(**arguments)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        from .serve import main as serve

        serve(argv[1:])
        return
    if argv[:1] in (["evaluate"], ["paper-table"]):
        from .evaluation import cli

        (cli.evaluate if argv[0] == "evaluate" else cli.paper_table)(argv[1:])
        return
    settings = parse_arguments(argv)
    from .demo.ask import ask
    from .demo.compare import requested_tables, run, write_results

    start = time.perf_counter()
    results = run(settings)
    print()
    print(write_results(results, settings))
    names = ", ".join(f"{table.name}.md/.png/.json" for table in requested_tables(settings))
    print(f"\nTables, plots and raw results in {settings.output_dir}/: {names}")
    if settings.tables == ["main"]:
        checkpoint = f"{settings.output_dir}/checkpoint"
        reply = ask(checkpoint, settings.output_dir)
        print(
            f"Saved the Vision Remember model (1/{settings.ratios[0] ** 2}) as a remote-code checkpoint: {checkpoint}"
        )
        print(
            f"Asked it about {reply['image']}: {reply['question']!r} -> {reply['answer']!r} (truth {reply['truth']!r})"
        )
    print(f"Done in {(time.perf_counter() - start) / 60:.1f} minutes.")


if __name__ == "__main__":
    main()
