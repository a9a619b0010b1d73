#!/usr/bin/env python
"""Strip Vision Remember from a grafted checkpoint (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6): the native architecture,
config and weight keys again (a thin command over `vr_hf.conversion.strip_vision_remember`)."""

import argparse
import sys

from vr_hf.conversion import strip_vision_remember
from vr_hf.conversion.cli import add_output_arguments, run


EPILOG = """example:
  python conversion/strip_vision_remember.py --source qwen2.5-vl-3b-vr --output-dir qwen2.5-vl-3b

  The output loads without remote code: AutoModelForImageTextToText.from_pretrained(OUTPUT_DIR).
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, help="folder or Hub id of a grafted checkpoint")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    return run(strip_vision_remember, args.source, args.output_dir, overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(main())
