#!/usr/bin/env python
"""Graft Vision Remember onto a Qwen2.5-VL checkpoint (a thin command over `vr_hf.conversion.graft_qwen2_5_vl`)."""

import sys

from vr_hf.conversion import graft_qwen2_5_vl
from vr_hf.conversion.cli import graft_command


EPILOG = """example:
  python conversion/graft_qwen2_5_vl.py --source Qwen/Qwen2.5-VL-3B-Instruct --output-dir qwen2.5-vl-3b-vr \\
      --remember-after-layers 0 3 --vision-feature-layers 7 15 23 31

  The output loads with AutoModelForImageTextToText.from_pretrained(OUTPUT_DIR, trust_remote_code=True) and
  AutoProcessor.from_pretrained(OUTPUT_DIR); its logits equal the source's until it is trained.
"""


def main(argv=None) -> int:
    return graft_command(graft_qwen2_5_vl, __doc__, EPILOG, argv)


if __name__ == "__main__":
    sys.exit(main())
