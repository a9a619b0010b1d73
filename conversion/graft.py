#!/usr/bin/env python
"""Graft Vision Remember onto a native Qwen2.5-VL, Qwen3-VL or MiniCPM-V 4.6 checkpoint (a thin command over
`vr_hf.conversion.graft`, which tells the backbone by the checkpoint's model type)."""

import sys

from vr_hf.conversion import graft
from vr_hf.conversion.cli import graft_command


EPILOG = """examples:
  python conversion/graft.py --source Qwen/Qwen2.5-VL-3B-Instruct --output-dir qwen2.5-vl-3b-vr \\
      --remember-after-layers 0 3 --vision-feature-layers 7 15 23 31
  python conversion/graft.py --source Qwen/Qwen3-VL-2B-Instruct --output-dir qwen3-vl-2b-vr --no-deepstack
  python conversion/graft.py --source openbmb/MiniCPM-V-4.6 --output-dir minicpm-v-4.6-vr

  The output loads with AutoModelForImageTextToText.from_pretrained(OUTPUT_DIR, trust_remote_code=True) and
  AutoProcessor.from_pretrained(OUTPUT_DIR); its logits equal the source's until it is trained.
"""


def main(argv=None) -> int:
    return graft_command(graft, __doc__, EPILOG, argv)


if __name__ == "__main__":
    sys.exit(main())
