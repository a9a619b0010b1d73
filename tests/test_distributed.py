"""The recipes under `accelerate launch` with each engine config of `examples/accelerate/`, 2 processes on the CPU.

DDP runs over gloo with `--use_cpu`; DeepSpeed ZeRO-2 and ZeRO-3 run through `launch_on_cpu.py`, which connects the
processes over gloo where accelerate picks no backend without a GPU. accelerate runs FSDP on GPUs only: the recipe
refuses the FSDP config here rather than fall back to DDP.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from safetensors.torch import load_file
from test_resume import EXAMPLES, recipe_argv, write_rows
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.backbones import BACKBONES
from vr_hf.recipes import check_engine
from vr_hf.tiny import tiny_config

from tiny_grafts import GRAFTED_CLASS, SETTINGS, native_configs


LAUNCH_ON_CPU = Path(__file__).resolve().parent / "launch_on_cpu.py"
DEEPSPEED_ENGINES = ("zero2", "zero3")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_recipe(
    engine: str,
    data: Path,
    output_dir: Path,
    *extra: str,
    recipe: str = "train_instruction",
    processes: int = 2,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run a recipe with `accelerate launch --config_file examples/accelerate/{engine}.yaml` and `processes` CPU
    processes: 2 steps of the tiny model, 2 samples per process per step, on `data` (a LLaVA JSON with its images
    beside it, e.g. from `write_rows`). `extra` goes to the recipe. Returns the finished launch, whatever its outcome.
    """
    if engine in DEEPSPEED_ENGINES:
        pytest.importorskip("deepspeed")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        f"{EXAMPLES}/accelerate/{engine}.yaml",
    ]
    launch += ["--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port())]
    argv = recipe_argv(data, output_dir, "--max_steps", "2", *extra)
    argv[argv.index("--global_batch_size") + 1] = str(2 * processes)  # no accumulation
    script = [str(EXAMPLES / f"{recipe}.py")]
    if engine in DEEPSPEED_ENGINES:
        script.insert(0, str(LAUNCH_ON_CPU))
    elif engine == "ddp":
        argv.append("--use_cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    command = launch + script + argv
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=output_dir.parent)


def assert_launch_succeeded(result: subprocess.CompletedProcess, output_dir: Path, processes: int = 2):
    assert result.returncode == 0, f"accelerate launch failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert f"global batch {2 * processes} = {processes} process(es) x 2 per device x 1 accumulation" in result.stdout
    state = json.loads((output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2]
    assert (output_dir / "processor_config.json").is_file()
    assert "pipeline_tag: image-text-to-text" in (output_dir / "README.md").read_text()


def test_ddp_run_completes(tmp_path):
    data, output_dir = write_rows(tmp_path / "data"), tmp_path / "output"
    assert_launch_succeeded(launch_recipe("ddp", data, output_dir), output_dir)
    assert (output_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("engine, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_run_shards_and_saves_the_whole_model(tmp_path, engine, stage):
    data, output_dir = write_rows(tmp_path / "data"), tmp_path / "output"
    assert_launch_succeeded(launch_recipe(engine, data, output_dir, "--save_steps", "1"), output_dir)

    shards = output_dir / "checkpoint-2" / "global_step2"
    engine_state = torch.load(next(shards.glob("*model_states.pt")), weights_only=False, map_location="cpu")
    assert engine_state["ds_config"]["zero_optimization"]["stage"] == stage
    assert engine_state["dp_world_size"] == 2
    assert len(list(shards.glob("*optim_states.pt"))) == 2  # one optimizer shard per rank

    # The whole model, gathered from the shards: step 2 trains the phase's parts and leaves the vision tower alone
    after_step_1 = load_file(output_dir / "checkpoint-1" / "model.safetensors")
    final = load_file(output_dir / "model.safetensors")
    assert set(final) == set(after_step_1) and len(final) > 100
    changed = {
        name.removeprefix("model.").split(".")[0] for name in final if not torch.equal(final[name], after_step_1[name])
    }
    assert changed - {"lm_head"} == {"multi_modal_projector", "image_newline", "vision_remember", "language_model"}


LAYER_CLASSES = {  # what FSDP2 must shard, at least: each family's decoder layers and vision encoder layers
    "llava_vr": {"Qwen2DecoderLayer", "SiglipEncoderLayer"},
    "qwen2_5_vl": {"Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"},
    "qwen3_vl": {"Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock"},
    "minicpmv4_6": {"Qwen3_5DecoderLayer", "MiniCPMV4_6VisionEncoderLayer"},
}


@pytest.mark.parametrize("family", list(BACKBONES))
def test_the_fsdp2_config_shards_every_family_by_its_own_layers(family):
    """The config names no layer classes: accelerate takes the model's `_no_split_modules`, which hold exactly the
    classes the model has (SigLIP also declares its text embeddings, which a vision tower lacks)."""
    config = yaml.safe_load((EXAMPLES / "accelerate" / "fsdp2.yaml").read_text())
    assert "fsdp_transformer_layer_cls_to_wrap" not in config["fsdp_config"]
    if family == "llava_vr":
        model = VisionRememberForConditionalGeneration(tiny_config())
    else:
        native = native_configs()[family].to_dict()
        native = {key: value for key, value in native.items() if key not in ("model_type", "architectures")}
        model = GRAFTED_CLASS[family](GRAFTED_CLASS[family].config_class(**native, **SETTINGS))
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert LAYER_CLASSES[family] <= {type(module).__name__ for module in model.modules() if policy(module)}


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_a_rank_without_images_trains_in_step_with_the_others(tmp_path, engine):
    """Every second batch has no image, and (sequential order, one batch per rank) they all go to rank 1: it still
    uses every parameter, in the same order as rank 0, so DDP needs no unused-parameter search and ZeRO-3's gathers
    match (a rank that skipped the vision path would hang them)."""
    data = write_rows(tmp_path / "data", text_only=frozenset({2, 3, 6, 7}))
    output_dir = tmp_path / "output"
    ordered = ("--train_sampling_strategy", "sequential", "--ddp_find_unused_parameters", "false")
    result = launch_recipe(engine, data, output_dir, *ordered, timeout=120)
    assert_launch_succeeded(result, output_dir)
    assert "kept 8 (4 text-only)" in result.stdout


def test_fsdp_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    data, output_dir = write_rows(tmp_path / "data", count=4), tmp_path / "output"
    result = launch_recipe("fsdp2", data, output_dir)
    assert result.returncode != 0
    assert "accelerate runs FSDP on GPUs only" in result.stderr
    assert not (output_dir / "checkpoint-2").exists()


def fake_args(distributed_type: str, num_processes: int, device: str = "cpu"):
    state = SimpleNamespace(
        distributed_type=distributed_type, num_processes=num_processes, device=torch.device(device)
    )
    return SimpleNamespace(distributed_state=state)


def test_unconnected_processes_and_dropped_deepspeed_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="started 2 processes but connected 1.*--use_cpu"):
        check_engine(fake_args("NO", 1))
    check_engine(fake_args("MULTI_CPU", 2))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="dropped DeepSpeed"):
        check_engine(fake_args("MULTI_CPU", 2))
    check_engine(fake_args("DEEPSPEED", 2))
