#!/usr/bin/env python
"""Graft Vision Remember onto a MiniCPM-V 4.6 checkpoint (a thin command over `vr_hf.conversion.graft_minicpmv4_6`)."""

import sys

from vr_hf.conversion import graft_minicpmv4_6
from vr_hf.conversion.cli import graft_command


EPILOG = """example:
  python conversion/graft_minicpmv.py --source openbmb/MiniCPM-V-4.6 --output-dir minicpm-v-4.6-vr \\
      --remember-after-layers 0 3 --vision-feature-layers 3 5 7

  Vision feature layers must be at full patch resolution: 0..insert_layer_id + 1. Both downsample modes ("16x":
  4x4 patches per token, "4x": 2x2) work. The output loads with
  AutoModelForImageTextToText.from_pretrained(OUTPUT_DIR, trust_remote_code=True) and
  AutoProcessor.from_pretrained(OUTPUT_DIR); its logits equal the source's until it is trained.
"""


def main(argv=None) -> int:
    return graft_command(graft_minicpmv4_6, __doc__, EPILOG, argv)


if __name__ == "__main__":
    sys.exit(main())
