"""`accelerate launch tests/launch_on_cpu.py RECIPE ARGS...` runs a recipe under DeepSpeed on a machine without GPUs.

There, accelerate 1.x picks no process-group backend for a DeepSpeed launch and leaves each process thinking it is
alone (one process, an unsharded dataloader). This connects the processes over gloo first and has the Trainer use that
state (`use_configured_state`); the recipe then runs unchanged. GPUs need none of this.
"""

import runpy
import sys

from accelerate import PartialState


PartialState(backend="gloo")
recipe, *arguments = sys.argv[1:]
sys.argv = [recipe, *arguments, "--accelerator_config", '{"use_configured_state": true}']
runpy.run_path(recipe, run_name="__main__")
