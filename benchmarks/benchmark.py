"""What Vision Remember costs: prefill, decode, memory and training step in two regimes, and its cross-attention paths.

Each regime builds uncompressed LLaVA-NeXT style models (1/1) and average-pooled ones (1/4, 1/9, ...), each pooled
model with and without Vision Remember (VR), random weights, and measures:

- **ratios from paired rounds** (`measure.paired_rounds`): time to first token (one prefill forward: tower, projector,
  decoder, VR, the last position's logits), decode (greedy steps with the KV cache after an untimed prefill) and a
  training step (forward, backward, SGD step), VR against the same model without it, and against uncompressed; each a
  median with its 95% bootstrap interval;
- **peak memory** of each model's prefill (parameters and buffers plus the rise during it);
- **a profile** of one prefill with and without VR at 1/9 (`profiles.txt`: kernels, device time, host operations);
- **the cross-attention paths** on the model's own inputs (`cross_attention.py`): keys and attention device time
  against the reference and the floor, max(bytes / bandwidth, FLOPs / matrix rate), both rates measured here.

The regimes: `host-bound`, one image (5 AnyRes views) and Qwen2-0.5B, where a prefill's host time exceeds its device
time; `compute-bound`, 8 images of 5 views in one batch and Qwen2-1.5B, where the device is busy. It prints one table
per measurement and the targets table last, and writes `benchmark.json`, `table.md`, `profiles.txt` and
`benchmark.png` (the paper's Figure 4: TTFT, decode and memory against compression, both regimes).

    python benchmarks/benchmark.py               # on a GPU: the paper's sizes (SigLIP-L/16-384), bf16
    python benchmarks/benchmark.py --cpu-small   # reduced sizes, float32, on the CPU (a dry run of the same steps)
"""

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.modeling_outputs import CausalLMOutputWithPast

from vr_hf import VisionRememberConfig, VisionRememberForConditionalGeneration
from vr_hf.modeling.configuration_vision_remember_settings import TRITON_WINDOWS
from vr_hf.modeling.vision_remember_triton import triton_problems
from vr_hf.tiny import TINY_TEXT, TINY_VISION

import cross_attention
from measure import Ceilings, copy_bandwidth, matmul_rate, paired_rounds, peak_memory_mb, wall_seconds


# The KV cache's name in outputs and arguments: Transformers 5.24 renamed `past_key_values` to `cache`.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
PROMPT_TEXT, ANSWER_TEXT = 24, 16  # text tokens around each image: prompt and (for training) answer
QWEN2_1_5B = dict(
    model_type="qwen2",
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
PAPER_PINPOINTS = [[384, 768], [768, 384], [768, 768]]


@dataclass
class Regime:
    name: str
    config: dict  # VisionRememberConfig arguments
    image_size: int  # each square image: AnyRes gives 4 tiles + the base view
    images: int  # one image per sample, all in one batch
    factors: list[int]  # downsample factors; 1 is uncompressed
    rounds: dict = field(default_factory=lambda: {"ttft": 30, "decode": 8, "train_step": 10})


@dataclass
class Setup:
    device: torch.device
    dtype: torch.dtype
    regimes: list[Regime]
    decode_tokens: int
    sizes: str


def paper_setup(rounds_scale: float) -> Setup:
    """SigLIP-L/16-384 (the config's default tower) and Qwen2-0.5B (its default decoder), AnyRes with 5 views, bf16;
    batched, with Qwen2-1.5B."""
    host = Regime("host-bound", dict(image_grid_pinpoints=PAPER_PINPOINTS), 768, 1, [1, 2, 3, 4])
    compute = Regime(
        "compute-bound",
        dict(image_grid_pinpoints=PAPER_PINPOINTS, text_config=QWEN2_1_5B),
        768,
        8,
        [1, 2, 3],
        {"ttft": 16, "decode": 4, "train_step": 4},
    )
    return Setup(torch.device("cuda"), torch.bfloat16, scale_rounds([host, compute], rounds_scale), 16, "paper")


def cpu_small_setup(rounds_scale: float) -> Setup:
    """The same shapes scaled down: 12x12 patches per view, 5 views, a 6-layer decoder (batched: 4 images, a wider
    8-layer decoder), float32."""
    vision = dict(
        TINY_VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, image_size=96, patch_size=8
    )
    small = dict(
        vision_config=vision,
        text_config=dict(TINY_TEXT, vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=6),
        image_token_id=2047,
        vision_feature_layers=[1, 2, 3],
        cross_attention_heads=4,
        image_grid_pinpoints=[[96, 192], [192, 96], [192, 192]],
    )
    wider = dict(small["text_config"], hidden_size=384, intermediate_size=1536, num_hidden_layers=8)
    host = Regime("host-bound", small, 192, 1, [1, 2, 3, 4], {"ttft": 12, "decode": 4, "train_step": 6})
    compute = Regime(
        "compute-bound", dict(small, text_config=wider), 192, 4, [1, 2, 3], {"ttft": 6, "decode": 2, "train_step": 3}
    )
    return Setup(torch.device("cpu"), torch.float32, scale_rounds([host, compute], rounds_scale), 8, "cpu-small")


def scale_rounds(regimes: list[Regime], scale: float) -> list[Regime]:
    for regime in regimes:
        regime.rounds = {name: max(2, round(count * scale)) for name, count in regime.rounds.items()}
    return regimes


def ratio_label(factor: int) -> str:
    return f"1/{factor**2}"


def attn_implementation(setup: Setup) -> str:
    """The fastest path: the Triton kernel for VR's windows where it runs here, SDPA for everything else."""
    return TRITON_WINDOWS if not triton_problems(torch.empty(0, device=setup.device)) else "sdpa"


def build(setup: Setup, regime: Regime, factor: int, use_vision_remember: bool, attn: str):
    config = VisionRememberConfig(
        **copy.deepcopy(regime.config), downsample_factor=factor, use_vision_remember=use_vision_remember
    )
    torch.manual_seed(0)
    with setup.device:
        model = VisionRememberForConditionalGeneration(config)
    model = model.to(setup.dtype).eval()
    model.set_attn_implementation(attn)
    return model


def model_inputs(model, setup: Setup, regime: Regime, answer: int = 0) -> dict:
    """One image per sample and a prompt around it (plus `answer` supervised tokens), as the processor lays it out."""
    config, size = model.config, (regime.image_size, regime.image_size)
    generator = torch.Generator().manual_seed(0)
    image = torch.full((model.model.image_layout.num_tokens(size),), config.image_token_id)
    rows = []
    for _ in range(regime.images):
        text = torch.randint(0, config.image_token_id, (PROMPT_TEXT + answer,), generator=generator)
        rows.append(torch.cat([text[:8], image, text[8:]]))
    input_ids = torch.stack(rows)
    side = config.vision_config.image_size
    views = model.model.image_layout.num_views(size)
    pixel_values = torch.randn(regime.images, views, 3, side, side, generator=generator)
    inputs = dict(
        input_ids=input_ids,
        pixel_values=pixel_values.to(setup.dtype),
        image_sizes=torch.tensor([size] * regime.images),
        prompt_mask=torch.ones_like(input_ids, dtype=torch.bool),  # as generate() sets it: all of it is the prompt
    )
    if answer:
        labels = torch.full_like(input_ids, -100)
        labels[:, -answer:] = input_ids[:, -answer:]
        inputs["labels"] = labels
    return {name: tensor.to(setup.device) for name, tensor in inputs.items()}


class Runner:
    """One model and what it runs: prefill, decode after an untimed prefill, a training step."""

    def __init__(self, model, setup: Setup, regime: Regime):
        self.model, self.setup = model, setup
        self.inputs = model_inputs(model, setup, regime)
        self.training_inputs = model_inputs(model, setup, regime, answer=ANSWER_TEXT)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

    @torch.inference_mode()
    def prefill(self):
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    def ttft(self) -> float:
        return wall_seconds(self.prefill, self.setup.device)

    @torch.inference_mode()
    def decode(self) -> float:
        """Seconds of `decode_tokens` greedy steps after a prefill (the prefill not counted)."""
        output = self.prefill()

        def steps():
            nonlocal output
            for _ in range(self.setup.decode_tokens):
                token = output.logits[:, -1:].argmax(-1)
                output = self.model(input_ids=token, **{CACHE: output[CACHE]}, use_cache=True)

        return wall_seconds(steps, self.setup.device)

    def train_step(self) -> float:
        def step():
            self.model(**self.training_inputs).loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

        self.model.train()
        try:
            return wall_seconds(step, self.setup.device)
        finally:
            self.model.eval()


def comparisons(regime: Regime) -> list[tuple[str, str, tuple[str, ...]]]:
    """(first, second, measurements): VR against the model without it at every ratio; each pooled model against
    uncompressed, for the time to first token."""
    pairs = []
    for factor in regime.factors[1:]:
        label = ratio_label(factor)
        pairs.append((f"{label} +VR", label, ("ttft", "decode", "train_step")))
        pairs += [(f"{label} +VR", "1/1", ("ttft",)), (label, "1/1", ("ttft",))]
    return pairs


def profile_prefill(runner: Runner) -> tuple[dict, str]:
    """One prefill under `torch.profiler`: device kernels, their time, host operations, and the top table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.setup.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    runner.prefill()
    with torch.profiler.profile(activities=activities) as profiler:
        runner.prefill()
    events = profiler.events()
    device_events = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    summary = dict(
        host_operations=sum(1 for event in events if event.device_type == torch.autograd.DeviceType.CPU),
        device_kernels=len(device_events),
        device_ms=sum(event.device_time for event in device_events) / 1e3,
    )
    sort_by = "self_cuda_time_total" if device_events else "self_cpu_time_total"
    return summary, profiler.key_averages().table(sort_by=sort_by, row_limit=15)


def run_regime(setup: Setup, regime: Regime, attn: str, ceilings: Ceilings, profiles: list[str]) -> dict:
    jobs = [(factor, False) for factor in regime.factors] + [(factor, True) for factor in regime.factors[1:]]
    runners = {}
    for factor, use_vision_remember in tqdm(jobs, desc=f"{regime.name}: build"):
        label = f"{ratio_label(factor)}{' +VR' if use_vision_remember else ''}"
        runners[label] = Runner(build(setup, regime, factor, use_vision_remember, attn), setup, regime)
    models = {
        label: dict(
            vision_tokens=int((runner.inputs["input_ids"] == runner.model.config.image_token_id).sum()),
            peak_memory_mb=peak_memory_mb(runner.model, runner.prefill, setup.device),
        )
        for label, runner in runners.items()
    }
    pairs = {}
    for first, second, names in tqdm(comparisons(regime), desc=f"{regime.name}: paired rounds"):
        for name in names:
            measured = paired_rounds(
                getattr(runners[first], name), getattr(runners[second], name), setup.device, regime.rounds[name]
            )
            pairs[f"{first} vs {second}: {name}"] = measured
    middle = ratio_label(3)
    profiled = {}
    for label in (middle, f"{middle} +VR"):
        profiled[label], table = profile_prefill(runners[label])
        profiles.append(f"## {regime.name}, {label}: one prefill\n{json.dumps(profiled[label])}\n{table}\n")
    del runners
    gc.collect()
    attention = {}
    for factor in tqdm(regime.factors[1:], desc=f"{regime.name}: cross-attention paths"):
        config = VisionRememberConfig(**copy.deepcopy(regime.config), downsample_factor=factor)
        attention[ratio_label(factor)] = cross_attention.measure(
            config, regime.image_size, regime.images, setup.device, setup.dtype, ceilings
        )
    return dict(images=regime.images, models=models, pairs=pairs, profiles=profiled, cross_attention=attention)


def ratio(results: dict, first: str, second: str, name: str) -> dict:
    return results["pairs"][f"{first} vs {second}: {name}"]["ratio"]


def interval(value: dict) -> str:
    return f"{value['median']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"


def seconds_of(results: dict, label: str, name: str) -> list[float]:
    """Every timing of model `label` for measurement `name`, over all the pairs it took part in."""
    found = []
    for key, pair in results["pairs"].items():
        first, rest = key.split(" vs ")
        second, measured = rest.split(": ")
        if measured == name:
            found += pair["first_s"] if first == label else pair["second_s"] if second == label else []
    return found


def per_forward_us(numbers: dict, blocks: int) -> float:
    """The cross-attention's cost per forward: its keys once, its attention once per block."""
    return numbers["keys_us"] + blocks * numbers["attend_us"]


def regime_table(name: str, results: dict) -> list[str]:
    models = results["models"]
    pooled = [label for label in models if label != "1/1" and "+VR" not in label]
    lines = [
        f"### {name}: {results['images']} image(s) per batch; median [95% interval] of paired rounds",
        "",
        "| ratio | vision tokens | TTFT VR/without | decode VR/without | train step VR/without | peak mem VR/without "
        "| TTFT VR/uncompressed | TTFT without/uncompressed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in pooled:
        remember = f"{label} +VR"
        memory = models[remember]["peak_memory_mb"] / models[label]["peak_memory_mb"]
        lines.append(
            f"| {label} | {models[label]['vision_tokens']} | {interval(ratio(results, remember, label, 'ttft'))} "
            f"| {interval(ratio(results, remember, label, 'decode'))} "
            f"| {interval(ratio(results, remember, label, 'train_step'))} | {memory:.3f} "
            f"| {interval(ratio(results, remember, '1/1', 'ttft'))} "
            f"| {interval(ratio(results, label, '1/1', 'ttft'))} |"
        )
    uncompressed = models["1/1"]
    ttft = statistics.median(seconds_of(results, "1/1", "ttft")) * 1e3
    lines += [
        "",
        f"Uncompressed (1/1, {uncompressed['vision_tokens']} vision tokens): TTFT {ttft:.1f} ms, peak memory "
        f"{uncompressed['peak_memory_mb']:.0f} MB.",
    ]
    for label, summary in results["profiles"].items():
        lines.append(
            f"One prefill at {label}, profiled: {summary['device_kernels']} device kernels, "
            f"{summary['device_ms']:.2f} ms of device time, {summary['host_operations']} host operations."
        )
    lines += [
        "",
        f"| cross-attention | keys per token | path | keys us | attend us | attend / its floor | per forward "
        f"({results['blocks']} blocks) us | reference / path, per forward |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, interactions in results["cross_attention"].items():
        for interaction, paths in interactions.items():
            reference = per_forward_us(paths["reference (eager)"], results["blocks"])
            for path, numbers in paths.items():
                total = per_forward_us(numbers, results["blocks"])
                lines.append(
                    f"| {label} {interaction} ({numbers['tokens']} tokens) | {numbers['keys_per_token']} | {path} "
                    f"| {numbers['keys_us']:.1f} | {numbers['attend_us']:.1f} "
                    f"| {numbers['attend_us'] / numbers['attend_floor_us']:.1f} | {total:.1f} "
                    f"| {reference / total:.2f} |"
                )
    return lines


def verdict(value: dict, limit: float, at_most: bool = True) -> str:
    """Met when the whole interval is on the right side of `limit`, missed when all of it is on the wrong side."""
    low, high = (value["low"], value["high"]) if at_most else (-value["high"], -value["low"])
    limit = limit if at_most else -limit
    return "met" if high <= limit else "missed" if low > limit else "not resolved (the interval spans the target)"


def targets_table(results: dict) -> list[str]:
    """The targets at 1/9 (and, batched, 1/4 against uncompressed), in both regimes."""
    lines = ["### Targets", "", "| regime | target | measured | |", "| --- | --- | --- | --- |"]
    for name, regime in results["regimes"].items():
        middle = "1/9"
        rows = []
        ttft = ratio(regime, f"{middle} +VR", middle, "ttft")
        rows.append(("prefill overhead at most 3% of TTFT (1/9)", interval(ttft), verdict(ttft, 1.03)))
        memory = regime["models"][f"{middle} +VR"]["peak_memory_mb"] / regime["models"][middle]["peak_memory_mb"]
        rows.append(("at most 3% of peak memory (1/9)", f"{memory:.3f}", "met" if memory <= 1.03 else "missed"))
        decode = ratio(regime, f"{middle} +VR", middle, "decode")
        within = decode["low"] <= 1.0 <= decode["high"]
        rows.append(("decode 1.00x within its interval (1/9)", interval(decode), "met" if within else "missed"))
        train = ratio(regime, f"{middle} +VR", middle, "train_step")
        rows.append(("training step at most +5% (1/9)", interval(train), verdict(train, 1.05)))
        local = regime["cross_attention"][middle]["local"]
        fused = local.get("triton (fused)")
        if fused is None:
            rows.append(("fused kernel within 2x of its floor, 5x the reference", "not run here (needs Triton)", ""))
        else:
            to_floor = fused["attend_us"] / fused["attend_floor_us"]
            blocks = regime["blocks"]
            speedup = per_forward_us(local["reference (eager)"], blocks) / per_forward_us(fused, blocks)
            rows.append(
                ("fused kernel within 2x of its floor", f"{to_floor:.2f}x", "met" if to_floor <= 2 else "missed")
            )
            rows.append(
                ("fused kernel at least 5x the reference", f"{speedup:.2f}x", "met" if speedup >= 5 else "missed")
            )
        if name == "compute-bound":
            figure4 = ratio(regime, "1/4 +VR", "1/1", "ttft")
            rows.append(("1/4 with VR at most 0.7x uncompressed TTFT", interval(figure4), verdict(figure4, 0.7)))
        lines += [f"| {name} | {target} | {measured} | {judged} |" for target, measured, judged in rows]
    return lines


def plot(results: dict, path: Path):
    """The paper's Figure 4 for each regime: time to first token, decode speed and peak memory per compression
    ratio, with and without Vision Remember, beside uncompressed LLaVA-NeXT."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    regimes = results["regimes"]
    metrics = [("ttft", "time to first token (ms)"), ("decode", "decode (tokens/s)"), ("memory", "peak memory (MB)")]
    figure, axes = plt.subplots(len(regimes), len(metrics), figsize=(4.5 * len(metrics), 3.4 * len(regimes)))
    for row, (name, regime) in zip(axes.reshape(len(regimes), -1), regimes.items()):
        labels = [label for label in regime["models"] if "+VR" not in label]
        positions = range(len(labels))

        def value(label: str, metric: str) -> float:
            """The model's median, NaN (no bar) where it was not measured."""
            if label not in regime["models"]:
                return math.nan
            if metric == "memory":
                return regime["models"][label]["peak_memory_mb"]
            seconds = seconds_of(regime, label, metric)
            if not seconds:
                return math.nan
            median = statistics.median(seconds)
            return median * 1e3 if metric == "ttft" else results["decode_tokens"] * regime["images"] / median

        for axis, (metric, title) in zip(row, metrics):
            without = [value(label, metric) for label in labels]
            remember = [value(f"{label} +VR", metric) for label in labels]
            axis.bar(
                [p - 0.2 for p in positions], without, width=0.4, label="without Vision Remember", color="#9bb7d4"
            )
            axis.bar([p + 0.2 for p in positions], remember, width=0.4, label="with Vision Remember", color="#e07b39")
            axis.set_xticks(list(positions), ["1/1\n(LLaVA-NeXT)"] + labels[1:])
            axis.set_title(f"{name}: {title}", fontsize=9)
    figure.legend(*axes.flat[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    figure.suptitle(f"{results['device']}, {results['dtype']}")
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    figure.savefig(path, dpi=120)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu_info = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in cpu_info if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads"


def return_freed_memory_to_the_system():
    """On the CPU, re-run this script with glibc's `MALLOC_MMAP_THRESHOLD_` fixed at 64 KiB, so that freed tensors go
    back to the system and each prefill's rise in resident memory is its own."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-small", action="store_true", help="reduced sizes in float32 on the CPU")
    parser.add_argument("--attn", default=None, help="attn_implementation (default: the Triton kernel where it runs)")
    parser.add_argument("--rounds", type=float, default=1.0, help="scale every measurement's number of rounds")
    parser.add_argument("--regime", choices=["host-bound", "compute-bound"], action="append", help="only these")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: robust on a shared CPU)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.cpu_small or not torch.cuda.is_available():
        return_freed_memory_to_the_system()
        setup = cpu_small_setup(args.rounds)
    else:
        setup = paper_setup(args.rounds)
    attn = args.attn or attn_implementation(setup)
    bandwidth, flops = copy_bandwidth(setup.device), matmul_rate(setup.device, setup.dtype)
    ceilings = Ceilings(bandwidth, flops)
    results = dict(
        device=device_name(setup.device),
        dtype=str(setup.dtype).removeprefix("torch."),
        attn_implementation=attn,
        torch=torch.__version__,
        sizes=setup.sizes,
        decode_tokens=setup.decode_tokens,
        copy_bandwidth_gb_s=bandwidth / 1e9,
        matmul_tflop_s=flops / 1e12,
        regimes={},
    )
    profiles = []
    for regime in setup.regimes:
        if args.regime is None or regime.name in args.regime:
            measured = run_regime(setup, regime, attn, ceilings, profiles)
            results["regimes"][regime.name] = dict(
                measured, blocks=len(VisionRememberConfig(**copy.deepcopy(regime.config)).remember_after_layers)
            )
    lines = [
        f"{results['device']}, {results['dtype']}, attn_implementation={attn}; copy {bandwidth / 1e9:.0f} GB/s, "
        f"matrix product {flops / 1e12:.1f} TFLOP/s (measured)",
        "",
    ]
    for name, regime in results["regimes"].items():
        lines += regime_table(name, regime) + [""]
    lines += targets_table(results)
    table = "\n".join(lines)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "table.md").write_text(table + "\n")
    (args.output_dir / "profiles.txt").write_text("\n".join(profiles))
    plot(results, args.output_dir / "benchmark.png")
    print(f"wrote {args.output_dir}/benchmark.json, table.md, profiles.txt, benchmark.png")


if __name__ == "__main__":
    main()
