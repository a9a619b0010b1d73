"""A 2-process data-parallel run of the instruction recipe with `accelerate launch` on the CPU (DDP over gloo)."""

import json
import os
import socket
import subprocess
import sys

from test_resume import EXAMPLES, recipe_argv, write_rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_run_completes(tmp_path):
    data = write_rows(tmp_path / "data")
    output_dir = tmp_path / "output"
    # `--multi_gpu` starts one process per rank through torchrun; without a GPU each trains on the CPU over gloo.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    argv = recipe_argv(data, output_dir, "--max-steps", "2")
    argv[argv.index("--batch-size") + 1] = "4"  # 2 processes x 2 per device, no accumulation
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    command = launch + [str(EXAMPLES / "train_instruction.py"), *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    assert "global batch 4 = 2 process(es) x 2 per device x 1 accumulation step(s)" in result.stdout
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "processor_config.json").is_file()
