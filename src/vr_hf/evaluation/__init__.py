"""Evaluation with lmms-eval: the `vr_hf` model, offline tasks, and the paper's benchmark table.

- `lmms_model.VisionRememberLMMS`: every vr-hf checkpoint as an lmms-eval model, `--model vr_hf`.
- `tasks/`: lmms-eval task definitions whose data ships inside packages (no Hub): the main job's fine-grained task and
  easy-VQA. Pass `TASKS_DIR` to lmms-eval as `--include_path`.
- `paper`: the paper's 11 benchmarks by their lmms-eval task names, and its Table 1 from lmms-eval's results.
- `cli`: `vr-hf evaluate`.

Nothing here imports lmms-eval until it is used: `pip install ".[eval]"` and lmms-eval itself (see docs/evaluation.md).
"""

from pathlib import Path


TASKS_DIR = str(Path(__file__).parent / "tasks")
