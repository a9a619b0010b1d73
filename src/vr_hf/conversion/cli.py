"""Arguments and error handling shared by the commands in `conversion/`."""

import argparse
import sys

from ..modeling.configuration_vision_remember_settings import INTERACTION_TYPES


SWITCHES = ("multi_level", "bidirectional", "text_guidance", "identity_init")


def add_output_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--output-dir", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")


def add_vision_remember_arguments(parser: argparse.ArgumentParser):
    """The Vision Remember settings every command that adds the blocks takes; `vision_remember_settings` reads them."""
    parser.add_argument(
        "--remember-after-layers", type=int, nargs="+", metavar="LAYER", help="0-based decoder layers (default 0 3)"
    )
    parser.add_argument(
        "--vision-feature-layers",
        type=int,
        nargs="+",
        metavar="LAYER",
        help="vision hidden states (0 = patch embeddings) of the multi-level features (default: the paper's [7, 15, "
        "23] of 24 layers, scaled to the encoder's depth)",
    )
    parser.add_argument("--interaction", choices=INTERACTION_TYPES, help="default: local")
    parser.add_argument(
        "--cross-attention-heads",
        type=int,
        help="must divide the feature width (default: the fewest heads, at least 8, with head_dim <= 256)",
    )
    for switch in SWITCHES:
        parser.add_argument(f"--no-{switch.replace('_', '-')}", action="store_true", help=f"turn {switch} off")


def add_backbone_arguments(parser: argparse.ArgumentParser):
    """The settings of one backbone's grafted config (`vision_remember_settings` reads them too)."""
    parser.add_argument("--no-deepstack", action="store_true", help="Qwen3-VL: turn its own DeepStack off")


def vision_remember_settings(args: argparse.Namespace) -> dict:
    """The config fields that `add_vision_remember_arguments`' arguments set."""
    settings = {
        name: getattr(args, name)
        for name in ("remember_after_layers", "vision_feature_layers", "interaction", "cross_attention_heads")
        if getattr(args, name) is not None
    }
    for switch in (*SWITCHES, "deepstack"):
        if getattr(args, f"no_{switch}", False):
            settings[switch] = False
    return settings


def graft_parser(description: str, epilog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="Hub id or folder of the native checkpoint")
    add_output_arguments(parser)
    add_vision_remember_arguments(parser)
    add_backbone_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the new blocks' initialisation")
    return parser


def run(conversion, *args, **kwargs) -> int:
    """Run a conversion; report its error on stderr with exit code 1."""
    try:
        output = conversion(*args, **kwargs)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


def graft_command(conversion, description: str, epilog: str, argv=None) -> int:
    """A graft command line: parse the shared arguments, run `conversion`, report."""
    args = graft_parser(description, epilog).parse_args(argv)
    return run(
        conversion,
        args.source,
        args.output_dir,
        overwrite=args.overwrite,
        seed=args.seed,
        **vision_remember_settings(args),
    )
