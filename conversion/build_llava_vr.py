#!/usr/bin/env python
"""Build a LLaVA-VR checkpoint from a pretrained vision tower and a pretrained decoder (a thin command over
`vr_hf.conversion.build_from_parts`)."""

import argparse
import json
import sys

from vr_hf.conversion import build_from_parts
from vr_hf.conversion.cli import add_output_arguments, add_vision_remember_arguments, run, vision_remember_settings
from vr_hf.modeling.configuration_llava_vr import PROJECTOR_TYPES, REFUSION_TYPES


EPILOG = """example:
  python conversion/build_llava_vr.py \\
      --vision-model google/siglip-so400m-patch14-384 --text-model Qwen/Qwen2-0.5B-Instruct \\
      --output-dir llava-vr-qwen2-0.5b --projector-type avg_pool --downsample-factor 3 \\
      --remember-after-layers 0 3 --anyres

  Local folders work the same way (--vision-model ./siglip --text-model ./qwen2). The output loads with
  AutoModelForImageTextToText.from_pretrained(OUTPUT_DIR, trust_remote_code=True) and
  AutoProcessor.from_pretrained(OUTPUT_DIR, trust_remote_code=True).
"""


def anyres_pinpoints(image_size: int, max_tiles: int = 2) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints pattern: every grid of up to `max_tiles` x `max_tiles` views."""
    return [
        [rows * image_size, cols * image_size]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
        if rows * cols > 1
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vision-model", required=True, help="Hub id or folder: SiglipVisionModel, SiglipModel, CLIP..."
    )
    parser.add_argument("--text-model", required=True, help="Hub id or folder of a *ForCausalLM with its tokenizer")
    parser.add_argument("--gguf-file", help="read the decoder from this GGUF file in --text-model (needs `gguf`)")
    add_output_arguments(parser)
    parser.add_argument("--projector-type", choices=PROJECTOR_TYPES, help="default: avg_pool")
    parser.add_argument("--downsample-factor", type=int, help="window side s, ratio 1/s^2 (default 3)")
    add_vision_remember_arguments(parser)
    parser.add_argument("--no-vision-remember", action="store_true", help="build the plain compressed baseline")
    parser.add_argument(
        "--refusion",
        choices=REFUSION_TYPES,
        help="the blocks: Vision Remember's (default) or a rival's in their place",
    )
    parser.add_argument(
        "--fastv-layer",
        type=int,
        help="FastV in Vision Remember's place (with --no-vision-remember): from this decoder layer on, only the "
        "vision tokens the prompt's last token attends to most remain",
    )
    parser.add_argument("--fastv-keep-ratio", type=float, help="the fraction FastV keeps (default 0.5)")
    anyres = parser.add_mutually_exclusive_group()
    anyres.add_argument("--anyres", action="store_true", help="AnyRes with views in grids up to 2x2 (LLaVA-NeXT)")
    anyres.add_argument(
        "--image-grid-pinpoints",
        type=json.loads,
        metavar="JSON",
        help='AnyRes resolutions, e.g. "[[384, 768], [768, 384]]"',
    )
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new parts' initialisation")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = vision_remember_settings(args)
    for name in (
        "projector_type",
        "downsample_factor",
        "image_grid_pinpoints",
        "refusion",
        "fastv_layer",
        "fastv_keep_ratio",
    ):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.no_vision_remember:
        overrides["use_vision_remember"] = False
    if args.anyres:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.vision_model)
        overrides["image_grid_pinpoints"] = anyres_pinpoints(getattr(config, "vision_config", config).image_size)
    return run(
        build_from_parts,
        args.vision_model,
        args.text_model,
        args.output_dir,
        gguf_file=args.gguf_file,
        overwrite=args.overwrite,
        dtype=args.dtype,
        seed=args.seed,
        **overrides,
    )


if __name__ == "__main__":
    sys.exit(main())
