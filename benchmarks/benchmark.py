"""Efficiency of Vision Remember: prefill, decode, memory and training cost, and its windowed-attention paths.

One run measures, for the same image and prompt, uncompressed LLaVA-NeXT style tokens (ratio 1/1) and average pooling
at 1/4, 1/9 and 1/16, each pooled model with and without Vision Remember; then the windowed cross-attention paths
against the reference and against their memory-bandwidth floor, each as launched and, on CUDA, as its device time (a
CUDA graph replayed, without the host's launches; on CPU the two are the same). It prints one table of ratios and
writes the raw numbers (`benchmark.json`) and a plot in the style of the paper's Figure 4 (`benchmark.png`).

    python benchmarks/benchmark.py               # the paper's sizes, bf16 on CUDA (random weights)
    python benchmarks/benchmark.py --cpu-small   # reduced sizes, float32 on CPU, about a minute

All models are built first and measured interleaved, in rounds that time each model once, after two warm-up rounds,
with Python's garbage collector paused; medians are reported. Time to first
token is one prefill forward (vision tower, projector, decoder, Vision Remember) with the
logits of the last position; decode is greedy steps with the KV cache. Peak memory of a model is its parameters and
buffers plus how far memory rises during a prefill, at its peak: on CUDA allocated tensors
(`torch.cuda.max_memory_allocated`), on CPU the process's resident set (`VmHWM` after a reset through
`/proc/self/clear_refs`, against `VmRSS` before). On CPU the script runs itself with glibc's `MALLOC_MMAP_THRESHOLD_`
fixed at 64 KiB, so that freed tensors go back to the system and each prefill's rise in resident memory is its own.
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.modeling_outputs import CausalLMOutputWithPast

from vr_hf import VisionRememberConfig, VisionRememberForConditionalGeneration
from vr_hf.modeling.image_layout import ImageLayout, image_windows
from vr_hf.modeling.vision_remember import TokenLayout, VisionRemember
from vr_hf.modeling.vision_remember_attention import (
    AttentionSettings,
    attend_images,
    attend_windows,
    flash_problems,
    uses_torch_varlen,
)
from vr_hf.tiny import TINY_TEXT, TINY_VISION


# The KV cache's name in outputs and arguments: Transformers 5.24 renamed `past_key_values` to `cache`.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
RATIOS = [1, 2, 3, 4]  # downsample factors: 1/1 (uncompressed), 1/4, 1/9, 1/16
PROMPT_TEXT, ANSWER_TEXT = 24, 16  # text tokens around the image: prompt and (for training) answer
# Rounds per repeat of each measurement: every round times each model once, so that a machine that slows down for a
# while slows every model alike. A prefill is short next to a decode: more rounds of it, for about the same time.
ROUNDS = {"ttft": 5, "decode": 2, "train_step": 1}


@dataclass
class Setup:
    config: dict
    image_size: int  # the square image: AnyRes gives 4 tiles + the base view
    device: torch.device
    dtype: torch.dtype
    repeats: int
    decode_tokens: int


def paper_setup(device, repeats, decode_tokens) -> Setup:
    """SigLIP-L/16-384 (the config's default), Qwen2-0.5B (its default), AnyRes with 5 views, bf16."""
    config = dict(image_grid_pinpoints=[[384, 768], [768, 384], [768, 768]])
    return Setup(config, 768, device, torch.bfloat16, repeats, decode_tokens)


def cpu_small_setup(repeats, decode_tokens) -> Setup:
    """The same shape of model, scaled down: 12x12 patches per view, 5 views, a 4-layer decoder, float32."""
    config = dict(
        vision_config=dict(
            TINY_VISION, hidden_size=128, intermediate_size=512, num_hidden_layers=4, image_size=96, patch_size=8
        ),
        text_config=dict(TINY_TEXT, vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=6),
        image_token_id=2047,
        vision_feature_layers=[1, 2, 3],
        cross_attention_heads=4,
        image_grid_pinpoints=[[96, 192], [192, 96], [192, 192]],
    )
    return Setup(config, 192, torch.device("cpu"), torch.float32, repeats, decode_tokens)


def build(setup: Setup, downsample_factor: int, use_vision_remember: bool, attn: str):
    config = VisionRememberConfig(
        **setup.config, downsample_factor=downsample_factor, use_vision_remember=use_vision_remember
    )
    torch.manual_seed(0)
    with setup.device:
        model = VisionRememberForConditionalGeneration(config)
    model = model.to(setup.dtype).eval()
    model.set_attn_implementation(attn)
    return model


def model_inputs(model, setup: Setup, answer: int = 0) -> dict:
    """One image and a prompt around it (plus `answer` supervised tokens), as the processor would lay them out."""
    config = model.config
    num_image_tokens = model.model.image_layout.num_tokens((setup.image_size, setup.image_size))
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.image_token_id, (PROMPT_TEXT + answer,), generator=generator)
    image = torch.full((num_image_tokens,), config.image_token_id)
    input_ids = torch.cat([text[:8], image, text[8:]])[None]
    num_views = model.model.image_layout.num_views((setup.image_size, setup.image_size))
    side = config.vision_config.image_size
    pixel_values = torch.randn(1, num_views, 3, side, side, generator=generator)
    inputs = dict(
        input_ids=input_ids,
        pixel_values=pixel_values.to(setup.dtype),
        image_sizes=torch.tensor([[setup.image_size, setup.image_size]]),
        prompt_mask=torch.ones_like(input_ids, dtype=torch.bool),  # as generate() sets it: all of it is the prompt
    )
    if answer:
        labels = torch.full_like(input_ids, -100)
        labels[:, -answer:] = input_ids[:, -answer:]
        inputs["labels"] = labels
    return {name: tensor.to(setup.device) for name, tensor in inputs.items()}


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(function, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(function, setup: Setup, warmup: int = 2) -> float:
    for _ in range(warmup):
        function()
    return statistics.median(seconds(function, setup.device) for _ in range(setup.repeats))


def replay_seconds(function, setup: Setup) -> float:
    """Median seconds of `function` captured once as a CUDA graph and replayed: its device time, without the host's
    launches (it must not wait on the device)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return median_seconds(graph.replay, setup, warmup=3)


def memory_mb(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device) / 2**20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:" if peak else "VmRSS:")[1].split()[0]) / 1024


def peak_memory_mb(model, function, device: torch.device) -> float:
    """The model's parameters and buffers plus how far memory rises above its level before `function` at the peak:
    on CUDA, allocated tensors; on CPU, the process's resident set (reset through `/proc/self/clear_refs`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")
    before = memory_mb(device, peak=False)
    function()
    tensors = [*model.parameters(), *model.buffers()]
    return memory_mb(device, peak=True) - before + sum(t.numel() * t.element_size() for t in tensors) / 2**20


class Runner:
    """One model's measurements, one at a time, so that all models are measured interleaved."""

    def __init__(self, model, setup: Setup, training: bool):
        self.model, self.setup = model, setup
        self.inputs = model_inputs(model, setup)
        self.training_inputs = model_inputs(model, setup, answer=ANSWER_TEXT) if training else None
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-6) if training else None
        self.times = {"ttft": [], "decode": [], "train_step": []}

    @torch.inference_mode()
    def prefill(self):
        return self.model(**self.inputs, use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def decode(self) -> float:
        """Seconds of `decode_tokens` greedy steps after a prefill (the prefill not counted)."""
        output = self.prefill()

        def steps():
            nonlocal output
            for _ in range(self.setup.decode_tokens):
                token = output.logits[:, -1:].argmax(-1)
                output = self.model(input_ids=token, **{CACHE: output[CACHE]}, use_cache=True)

        return seconds(steps, self.setup.device)

    def train_step(self):
        self.model.train()
        self.model(**self.training_inputs).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()

    def measurements(self) -> dict:
        """Each measurement this model takes: its name to a function that returns seconds."""
        device = self.setup.device
        measurements = {"ttft": lambda: seconds(self.prefill, device), "decode": self.decode}
        if self.optimizer:
            measurements["train_step"] = lambda: seconds(self.train_step, device)
        return measurements

    def results(self) -> dict:
        median = {name: statistics.median(times) for name, times in self.times.items() if times}
        numbers = dict(
            vision_tokens=int((self.inputs["input_ids"] == self.model.config.image_token_id).sum()),
            ttft_ms=median["ttft"] * 1e3,
            decode_tokens_per_s=self.setup.decode_tokens / median["decode"],
            peak_memory_mb=peak_memory_mb(self.model, self.prefill, self.setup.device),
        )
        if "train_step" in median:
            numbers["train_step_ms"] = median["train_step"] * 1e3
        return numbers


def bandwidth_gb_s(setup: Setup) -> float:
    """Measured memory bandwidth: a large copy reads and writes each byte once."""
    source = torch.empty(64 * 2**20 if setup.device.type == "cpu" else 1024 * 2**20, dtype=torch.uint8)
    source = source.to(setup.device)
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), setup)
    return 2 * source.numel() / seconds / 1e9


def cross_attention_paths(config: VisionRememberConfig, device, dtype) -> dict[str, str]:
    """The cross-attention paths to time: name to `attn_implementation`, FlashAttention's varlen kernels (the
    flash-attn package's, or torch's own without it) where they can run."""
    paths = {"reference (eager)": "eager", "sdpa": "sdpa"}
    settings = AttentionSettings(config, config.remember_feature_size // config.cross_attention_heads)
    settings.config._attn_implementation = "flash_attention_2"
    if not flash_problems(settings, torch.empty(0, device=device, dtype=dtype)):
        kernels = "torch" if uses_torch_varlen("flash_attention_2") else "flash-attn"
        paths[f"flash varlen ({kernels})"] = "flash_attention_2"
    return paths


def measure_cross_attention(setup: Setup, downsample_factor: int, bandwidth: float) -> dict:
    """Each token-feature cross-attention path on one AnyRes image (5 views): every token over its local window, and
    over the whole image (`global`: the image's features shared as keys), against the reference and the bandwidth
    floor (every feature and query read once, every output written once)."""
    config = VisionRememberConfig(**setup.config, downsample_factor=downsample_factor)
    heads = config.cross_attention_heads
    head_dim = config.remember_feature_size // heads
    tokens, features = 5 * config.tokens_per_side**2, 5 * config.grid_size**2
    generator = torch.Generator().manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=generator).to(setup.device, setup.dtype)

    query = random(tokens, heads, head_dim)
    inputs = {
        "local": (random(tokens, downsample_factor**2, heads, head_dim),),
        "global": (random(features, heads, head_dim), [tokens], [features], image_lengths(tokens, features, setup)),
    }
    attention = {"local": attend_windows, "global": attend_images}
    results = {}
    for interaction, keys in inputs.items():
        floor = (keys[0].numel() + 2 * query.numel()) * query.element_size() / (bandwidth * 1e9)
        results[interaction] = {}
        for name, implementation in cross_attention_paths(config, setup.device, setup.dtype).items():
            config._attn_implementation = implementation
            settings = AttentionSettings(config, head_dim)
            with torch.inference_mode():

                def run():
                    return attention[interaction](settings, query, *keys)

                seconds = median_seconds(run, setup, warmup=3)
                memory = peak_memory_mb(settings, run, setup.device)
                device_seconds = replay_seconds(run, setup) if setup.device.type == "cuda" else seconds
            results[interaction][name] = dict(
                ms=seconds * 1e3,
                device_ms=device_seconds * 1e3,
                floor_ms=floor * 1e3,
                peak_memory_mb=memory,
                tokens=tokens,
                keys=keys[0].shape[-3],
            )
    return results


def image_lengths(tokens: int, features: int, setup) -> tuple:
    """One image's token and feature counts as `attend_images` takes them for FlashAttention: int32 on the device."""
    return tuple(torch.tensor([count], dtype=torch.int32, device=setup.device) for count in (tokens, features))


def measure_block_graph(setup: Setup, downsample_factor: int) -> dict:
    """One Vision Remember block (context preparation included) launched op by op, and replayed as one CUDA graph:
    the block waits on the device nowhere, so it can be captured, and the replay saves the launches."""
    config = VisionRememberConfig(**setup.config, downsample_factor=downsample_factor, identity_init=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    module = VisionRemember(config).to(setup.device, setup.dtype).eval()
    layout = ImageLayout.from_config(config)
    size = (setup.image_size, setup.image_size)
    windows = image_windows(config, [size])
    features = [torch.randn(layout.num_views(size) * config.grid_size**2, config.remember_feature_size)]
    features = [image.to(setup.device, setup.dtype) for image in features]
    length = PROMPT_TEXT + len(windows[0])
    placeholders = torch.zeros(1, length, dtype=torch.bool)
    placeholders[0, 8 : 8 + len(windows[0])] = True
    token_layout = TokenLayout.from_turns(
        placeholders, torch.zeros(1, length, dtype=torch.long), ~placeholders, setup.device
    )
    hidden_states = torch.randn(1, length, config.text_config.hidden_size).to(setup.device, setup.dtype)
    block = module.layers[str(config.remember_after_layers[0])]

    def step():
        return block(hidden_states, module.prepare(token_layout, features, windows))

    with torch.inference_mode():
        eager = median_seconds(step, setup, warmup=3)
        replay = replay_seconds(step, setup)
    return dict(eager_ms=eager * 1e3, graph_ms=replay * 1e3, tokens=len(windows[0]))


def ratio_label(downsample_factor: int) -> str:
    return f"1/{downsample_factor**2}"


def run(setup: Setup, attn: str, training: bool, warmup: int = 2) -> dict:
    jobs = [(factor, False) for factor in RATIOS] + [(factor, True) for factor in RATIOS if factor > 1]
    runners = {}
    for factor, use_vision_remember in tqdm(jobs, desc="build"):
        label = f"{ratio_label(factor)}{' +VR' if use_vision_remember else ''}"
        runners[label] = Runner(build(setup, factor, use_vision_remember, attn), setup, training and factor > 1)
    gc.collect()
    gc.disable()  # as timeit does: a collection inside one model's timing would be charged to it alone
    for name, rounds in ROUNDS.items():
        for round in tqdm(range(warmup + rounds * setup.repeats), desc=f"{name}, models interleaved"):
            for runner in runners.values():
                measure = runner.measurements().get(name)
                if measure is not None:
                    seconds = measure()
                    if round >= warmup:
                        runner.times[name].append(seconds)
    gc.enable()
    results = {"models": {label: runner.results() for label, runner in runners.items()}, "cross_attention": {}}
    del runners
    gc.collect()
    bandwidth = bandwidth_gb_s(setup)
    results["bandwidth_gb_s"] = bandwidth
    for factor in tqdm(RATIOS[1:], desc="cross-attention paths"):
        results["cross_attention"][ratio_label(factor)] = measure_cross_attention(setup, factor, bandwidth)
    if setup.device.type == "cuda":
        results["block_graph"] = {ratio_label(factor): measure_block_graph(setup, factor) for factor in RATIOS[1:]}
    return results


def ratio_table(results: dict) -> str:
    """One markdown table: Vision Remember against the same model without it, both against uncompressed, and the
    windowed-attention paths against the reference and their floor."""
    models = results["models"]
    uncompressed = models["1/1"]
    lines = [
        "| ratio | vision tokens | TTFT ms (VR / without) | TTFT VR/without | decode tok/s VR/without "
        "| peak mem VR/without | train step VR/without | TTFT VR/uncompressed | mem VR/uncompressed |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for factor in RATIOS[1:]:
        label = ratio_label(factor)
        base, remember = models[label], models[f"{label} +VR"]
        train = (
            f"{remember['train_step_ms'] / base['train_step_ms']:.3f}" if "train_step_ms" in base else "not measured"
        )
        lines.append(
            f"| {label} | {base['vision_tokens']} | {remember['ttft_ms']:.1f} / {base['ttft_ms']:.1f} "
            f"| {remember['ttft_ms'] / base['ttft_ms']:.3f} "
            f"| {remember['decode_tokens_per_s'] / base['decode_tokens_per_s']:.3f} "
            f"| {remember['peak_memory_mb'] / base['peak_memory_mb']:.3f} | {train} "
            f"| {remember['ttft_ms'] / uncompressed['ttft_ms']:.3f} "
            f"| {remember['peak_memory_mb'] / uncompressed['peak_memory_mb']:.3f} |"
        )
    lines += [
        "",
        "| cross-attention | keys per token | path | launched ms | device ms | reference / path (device) "
        "| path / bandwidth floor (device) | peak MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, interactions in results["cross_attention"].items():
        for interaction, paths in interactions.items():
            reference = paths["reference (eager)"]["device_ms"]
            for name, numbers in paths.items():
                ms = numbers["device_ms"]
                lines.append(
                    f"| {label} {interaction} ({numbers['tokens']} tokens) | {numbers['keys']} | {name} "
                    f"| {numbers['ms']:.3f} | {ms:.3f} | {reference / ms:.2f} | {ms / numbers['floor_ms']:.1f} "
                    f"| {numbers['peak_memory_mb']:.1f} |"
                )
    if "block_graph" in results:
        lines += ["", "| one block, context included | tokens | launched ms | CUDA graph ms | saved |"]
        lines.append("| --- | --- | --- | --- | --- |")
        for label, numbers in results["block_graph"].items():
            eager, graph = numbers["eager_ms"], numbers["graph_ms"]
            lines.append(f"| {label} | {numbers['tokens']} | {eager:.3f} | {graph:.3f} | {1 - graph / eager:.0%} |")
    return "\n".join(lines)


def plot(results: dict, path: Path):
    """Figure 4 of the paper: time to first token, decode speed and memory per compression ratio, with and without
    Vision Remember, beside uncompressed LLaVA-NeXT."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = results["models"]
    labels = [ratio_label(factor) for factor in RATIOS]
    metrics = [("ttft_ms", "time to first token (ms)"), ("decode_tokens_per_s", "decode (tokens/s)")]
    metrics.append(("peak_memory_mb", "peak memory (MB)"))
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6))
    positions = range(len(labels))
    for axis, (key, title) in zip(axes, metrics):
        without = [models[label][key] for label in labels]
        remember = [models.get(f"{label} +VR", {}).get(key, 0.0) for label in labels]
        axis.bar([p - 0.2 for p in positions], without, width=0.4, label="without Vision Remember", color="#9bb7d4")
        axis.bar([p + 0.2 for p in positions], remember, width=0.4, label="with Vision Remember", color="#e07b39")
        axis.set_xticks(list(positions), ["1/1\n(LLaVA-NeXT)"] + labels[1:])
        axis.set_title(title)
        axis.set_xlabel("compression ratio")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8)
    figure.suptitle(f"{results['device']}, {results['dtype']}")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=120)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu_info = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip() for line in cpu_info.read_text().splitlines() if line.startswith("model name")
    ]
    return f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads"


def return_freed_memory_to_the_system():
    """Re-run this script with large allocations mapped and unmapped one by one (see the module docstring)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-small", action="store_true", help="reduced sizes in float32 on the CPU")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of every model (default: sdpa)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed per run")
    parser.add_argument("--no-training", action="store_true", help="skip the training-step measurements")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: robust on a shared CPU)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.cpu_small or not torch.cuda.is_available():
        return_freed_memory_to_the_system()
        setup = cpu_small_setup(args.repeats or 9, args.decode_tokens or 32)
    else:
        setup = paper_setup(torch.device("cuda"), args.repeats or 10, args.decode_tokens or 32)
    results = run(setup, args.attn, training=not args.no_training)
    results.update(
        device=device_name(setup.device),
        dtype=str(setup.dtype).removeprefix("torch."),
        attn_implementation=args.attn,
        torch=torch.__version__,
        sizes="cpu-small" if setup.device.type == "cpu" else "paper",
        repeats=setup.repeats,
        decode_tokens=setup.decode_tokens,
    )
    table = ratio_table(results)
    print(table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "benchmark.json").write_text(json.dumps(results, indent=2))
    (args.output_dir / "table.md").write_text(table + "\n")
    plot(results, args.output_dir / "benchmark.png")
    print(f"wrote {args.output_dir}/benchmark.json, table.md, benchmark.png")


if __name__ == "__main__":
    main()
