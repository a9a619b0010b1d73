"""Every fast attention path of Vision Remember against the reference: Transformers' eager attention, padded."""

import importlib.util

import pytest
import torch
from torch.nn import functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.modeling import vision_remember, vision_remember_attention, vision_remember_triton
from vr_hf.modeling.configuration_vision_remember_settings import TRITON_WINDOWS
from vr_hf.modeling.image_layout import ImageLayout, image_windows
from vr_hf.modeling.vision_remember import OutputProjection, TokenLayout, VisionRemember
from vr_hf.modeling.vision_remember_attention import AttentionSettings, attend_windows
from vr_hf.modeling.vision_remember_triton import WindowedCrossAttention, feature_statistics, reference
from vr_hf.tiny import tiny_config

from conftest import active_model


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MISSING_FOR_FLASH = [
    missing
    for missing, available in [
        ("a CUDA device", torch.cuda.is_available()),
        (
            "flash-attn or torch.nn.attention.varlen",
            importlib.util.find_spec("flash_attn") is not None or vision_remember_attention.varlen_attn is not None,
        ),
    ]
    if not available
]
FLASH_ATTN = pytest.mark.skipif(bool(MISSING_FOR_FLASH), reason="needs " + " and ".join(MISSING_FOR_FLASH))
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
# The Triton kernel: on a GPU compiled, on the CPU interpreted (conftest sets TRITON_INTERPRET=1 there)
TRITON = pytest.param(
    TRITON_WINDOWS, marks=pytest.mark.skipif(vision_remember_triton.triton is None, reason="needs triton")
)
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}
STAND_IN = "flash_varlen_stand_in"  # FlashAttention through Transformers' attention interface, stood in for
TORCH_VARLEN = "flash_attention_2"  # without the flash-attn package: torch's own varlen kernels, stood in for


def varlen_stand_in(module, query, key, value, attention_mask, scaling, cu_seq_lens_q, cu_seq_lens_k, **kwargs):
    """FlashAttention's varlen call as Transformers makes it, on any device: block-diagonal SDPA over packed
    sequences `(1, heads, total, head_dim)`, so the packing around it can be tested without CUDA."""
    query_sequence = torch.bucketize(torch.arange(query.shape[2], device=query.device), cu_seq_lens_q[1:], right=True)
    key_sequence = torch.bucketize(torch.arange(key.shape[2], device=key.device), cu_seq_lens_k[1:], right=True)
    mask = query_sequence[:, None] == key_sequence[None]
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return output.transpose(1, 2), None


def torch_varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
    """`torch.nn.attention.varlen.varlen_attn` on any device: `(total, heads, head_dim)` in and out, scaled by
    `head_dim**-0.5`."""
    scale = query.shape[-1] ** -0.5
    query, key, value = (tensor[None].transpose(1, 2) for tensor in (query, key, value))
    return varlen_stand_in(None, query, key, value, None, scale, cu_seq_q, cu_seq_k)[0][0]


@pytest.fixture
def stand_in_flash(monkeypatch):
    """Route the `flash` paths to `varlen_stand_in` (Transformers' interface, `STAND_IN`) and, for `TORCH_VARLEN`
    asked for without the flash-attn package, to `torch_varlen_stand_in`."""
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, STAND_IN, varlen_stand_in)
    monkeypatch.setattr(vision_remember_attention, "flash_problems", lambda module, tensor: [])
    monkeypatch.setitem(vision_remember_attention.FLASH_PACKAGES, TORCH_VARLEN, lambda: False)
    monkeypatch.setattr(vision_remember_attention, "varlen_attn", torch_varlen_stand_in)


def settings(implementation: str, head_dim: int) -> AttentionSettings:
    config = tiny_config()
    config._attn_implementation = implementation
    return AttentionSettings(config, head_dim)


def random_windows(num_tokens: int, width: int, heads: int, head_dim: int, holes: bool, dtype, device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(num_tokens, heads, head_dim, generator=generator)
    window = torch.randn(num_tokens, width, heads, head_dim, generator=generator)
    mask = None
    if holes:  # every window keeps its first feature, as `prepare` guarantees
        mask = torch.rand(num_tokens, width, generator=generator) > 0.4
        mask[:, 0] = True
    to = dict(dtype=dtype, device=device)
    return query.to(**to), window.to(**to), None if mask is None else mask.to(device)


SHAPES = [(7, 9, 2, 8, False), (5, 25, 3, 16, False), (6, 16, 1, 32, True), (4, 81, 4, 8, True), (1, 4, 2, 8, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "tokens{}-window{}-heads{}-dim{}-holes{}".format(*shape))
@pytest.mark.parametrize("implementation", ["sdpa", STAND_IN, TORCH_VARLEN])
def test_windowed_attention_equals_reference(shape, dtype, device, implementation, stand_in_flash):
    num_tokens, width, heads, head_dim, holes = shape
    query, window, mask = random_windows(num_tokens, width, heads, head_dim, holes, dtype, device, seed=width)
    expected = attend_windows(settings("eager", head_dim), query, window, mask)
    output = attend_windows(settings(implementation, head_dim), query, window, mask)
    assert output.shape == (num_tokens, heads, head_dim) and output.dtype == dtype
    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])


def blocks(downsample_factor: int, interaction: str, implementation: str, dtype) -> VisionRemember:
    """Vision Remember blocks for 15x15-patch views, so that windows of 3x3 and 5x5 both tile them."""
    tiny = tiny_config()
    config = tiny_config(
        vision_config=dict(tiny.vision_config.to_dict(), image_size=45),
        image_grid_pinpoints=[[45, 90], [90, 45], [90, 90]],
        downsample_factor=downsample_factor,
        interaction=interaction,
        identity_init=False,
    )
    config._attn_implementation = implementation
    torch.manual_seed(0)
    module = VisionRemember(config)
    for submodule in module.modules():
        if isinstance(submodule, OutputProjection):
            torch.nn.init.normal_(submodule.weight, std=0.5)
    return module.to(dtype)


def context_inputs(module: VisionRemember, dtype, device="cpu"):
    """Two samples with one AnyRes image each (unpadded tiles, newline tokens), the first in two turns, a text-only
    sample, left padding: the layout, features and windows `prepare` takes, and hidden states."""
    config = module.config
    sizes = [(50, 100), (100, 80)]
    layout = ImageLayout.from_config(config)
    rows = [layout.num_views(size) * config.grid_size**2 for size in sizes]
    windows = image_windows(config, sizes)
    features = [torch.randn(count, config.remember_feature_size).to(dtype).to(device) for count in rows]
    counts = [len(window) for window in windows]
    length = max(counts) + 8
    placeholders = torch.zeros(3, length, dtype=torch.bool)
    for row, count in enumerate(counts):
        placeholders[row, 5 + 2 * row : 5 + 2 * row + count] = True
    pooled = torch.zeros(3, length, dtype=torch.bool)
    pooled[:, 2:5] = True
    pooled[1, :] = False  # one sample without prompt text: its text-guided token is masked out
    turns = torch.zeros(3, length, dtype=torch.long)
    turns[0, 5 + counts[0] // 2 :] = 1  # a prompt ends in sample 0's image: its second half is a later turn's...
    pooled[0, -1] = True  # ...whose text-guided token also pools the last position
    hidden_states = torch.randn(3, length, config.text_config.hidden_size).to(dtype)
    token_layout = TokenLayout.from_turns(placeholders, turns, pooled, torch.device(device))
    return (token_layout, features, windows), hidden_states.to(device)  # windows stay on the host, as the model's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "downsample_factor, interaction",
    [(3, "local"), (5, "local"), (3, "global"), (5, "deformable")],
)
@pytest.mark.parametrize("implementation", ["sdpa", STAND_IN, TORCH_VARLEN, TRITON])
def test_blocks_equal_reference(downsample_factor, interaction, implementation, dtype, stand_in_flash):
    """Both sub-layers of every block, on real windows: the packed and SDPA paths against eager."""
    reference = blocks(downsample_factor, interaction, "eager", dtype)
    fast = blocks(downsample_factor, interaction, implementation, dtype)
    inputs, hidden_states = context_inputs(reference, dtype)
    context = reference.prepare(*inputs)
    assert not context.windowed.all(), "newline tokens have no window"
    keys = context.image_features if interaction == "global" else context.window_features
    assert keys.dtype == dtype

    with torch.no_grad():
        expected = reference.layers["0"](hidden_states, context)
        fast_context = fast.prepare(*inputs)
        output = fast.layers["0"](hidden_states, fast_context)
    fused = implementation == TRITON_WINDOWS and interaction == "local"
    assert (fast_context.feature_statistics is not None) == fused, "the kernel runs where, and only where, asked"
    torch.testing.assert_close(output, expected, **TOLERANCES[dtype])


def test_blocks_gradients_equal_reference(stand_in_flash):
    reference = blocks(3, "local", "eager", torch.float32)
    inputs, hidden_states = context_inputs(reference, torch.float32)
    fast = ["sdpa", STAND_IN, TORCH_VARLEN] + [TRITON_WINDOWS] * (vision_remember_triton.triton is not None)
    gradients = {}
    for implementation in ("eager", *fast):
        module = blocks(3, "local", implementation, torch.float32)
        module.layers["0"](hidden_states, module.prepare(*inputs)).square().mean().backward()
        gradients[implementation] = {name: parameter.grad for name, parameter in module.named_parameters()}
    for implementation in fast:
        for name, gradient in gradients["eager"].items():
            torch.testing.assert_close(gradients[implementation][name], gradient, atol=1e-4, rtol=1e-4, msg=name)


def random_features(num_tokens, width, heads, head_dim, levels, dtype, device, seed):
    """A window layout over features of `levels` levels (a head's channels may span two), with holes and one token
    (the third) with no window at all, as `prepare` leaves an AnyRes newline: only its first slot, masked in."""
    generator = torch.Generator().manual_seed(seed)
    width_of_features = heads * head_dim
    num_rows = 3 * num_tokens
    features = torch.randn(num_rows, width_of_features, generator=generator) * 3 + 1
    weight, bias = torch.randn(2, width_of_features, generator=generator)
    query = torch.randn(num_tokens, heads, head_dim, generator=generator)
    window_index = torch.randint(0, num_rows, (num_tokens, width), generator=generator)
    window_mask = torch.rand(num_tokens, width, generator=generator) > 0.3
    window_mask[:, 0] = True
    window_mask[2, 1:] = False
    to = dict(dtype=dtype, device=device)
    floats = [tensor.to(**to) for tensor in (query, features, weight, bias)]
    return floats, window_index.to(device), window_mask.to(device), width_of_features // levels


@pytest.mark.skipif(vision_remember_triton.triton is None, reason="needs triton")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 9, 4, 12, 3), (5, 4, 4, 16, 2), (6, 16, 3, 8, 2), (3, 25, 1, 20, 4)])
def test_triton_kernel_equals_reference(shape, dtype, device):
    """The kernel against the reference in float64 (gather, LayerNorm per level, softmax attention): odd windows and
    head dims, heads within one level and across level borders, holes, a token without a window; every output
    written."""
    num_tokens, width, heads, head_dim, levels = shape
    (query, features, weight, bias), window_index, window_mask, level_size = random_features(
        *shape[:4], levels, dtype, device, seed=width
    )
    statistics = feature_statistics(features, levels, 1e-5)
    scale = head_dim**-0.5
    output = vision_remember_triton.launch(
        query, features, weight, bias, statistics, window_index, window_mask, level_size, scale
    )
    doubles = [tensor.double() for tensor in (query, features, weight, bias)]
    expected = reference(*doubles, window_index, window_mask, level_size, 1e-5, scale)
    assert output.shape == query.shape and output.dtype == dtype and output.isfinite().all()
    error = (output.double() - expected).norm() / expected.norm()
    assert error < (1e-6 if dtype == torch.float32 else 1e-2), error


@pytest.mark.skipif(vision_remember_triton.triton is None, reason="needs triton")
def test_triton_kernel_gradients_equal_reference():
    (query, features, weight, bias), window_index, window_mask, level_size = random_features(
        5, 9, 3, 8, 2, torch.float32, "cpu", seed=0
    )
    inputs = [tensor.requires_grad_() for tensor in (query, features, weight, bias)]
    statistics = feature_statistics(features.detach(), 2, 1e-5)
    settings = level_size, 1e-5, 8**-0.5
    output = WindowedCrossAttention.apply(*inputs, statistics, window_index, window_mask, *settings)
    upstream = torch.randn_like(output)
    fused = torch.autograd.grad(output, inputs, upstream)
    expected = torch.autograd.grad(reference(*inputs, window_index, window_mask, *settings), inputs, upstream)
    for name, gradient, reference_gradient in zip(("query", "features", "weight", "bias"), fused, expected):
        torch.testing.assert_close(gradient, reference_gradient, msg=name)


def test_triton_falls_back_to_sdpa_and_says_why(monkeypatch):
    """The kernel asked for where it cannot run: outside the interpreter on the CPU, without Triton, for
    interactions without fixed windows. SDPA runs, and a message says why."""
    messages = []
    monkeypatch.setattr(vision_remember_triton.logger, "warning_once", messages.append)
    inputs, _ = context_inputs(blocks(3, "local", TRITON_WINDOWS, torch.float32), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert blocks(3, "local", TRITON_WINDOWS, torch.float32).prepare(*inputs).feature_statistics is None
    monkeypatch.setattr(vision_remember_triton, "triton", None)
    blocks(3, "local", TRITON_WINDOWS, torch.float32).prepare(*inputs)
    blocks(3, "global", TRITON_WINDOWS, torch.float32).prepare(*inputs)
    assert len(messages) == 3 and all("Vision Remember runs on SDPA" in message for message in messages)
    assert "CUDA devices (or CPU tensors under TRITON_INTERPRET=1), not cpu" in messages[0]
    assert "Triton is not installed" in messages[1]
    assert "Triton is not installed" in messages[2] and "interaction='global' has no fixed windows" in messages[2]


def test_flash_falls_back_to_sdpa_and_says_why(monkeypatch):
    """FlashAttention asked for where it cannot run (here: CPU, float32, head_dim 384): SDPA, and a message."""
    messages = []
    monkeypatch.setattr(vision_remember_attention.logger, "warning_once", messages.append)
    query, window, mask = random_windows(5, 9, 2, 384, True, torch.float32, "cpu", seed=0)
    output = attend_windows(settings("flash_attention_2", 384), query, window, mask)
    torch.testing.assert_close(output, attend_windows(settings("eager", 384), query, window, mask))
    assert len(messages) == 1
    for reason in ("flash_attention_2", "CUDA", "float16 or bfloat16", "head_dim 384", "falls back to sdpa"):
        assert reason in messages[0]


def test_flash_without_its_package_or_torch_varlen_says_so(monkeypatch):
    monkeypatch.setitem(vision_remember_attention.FLASH_PACKAGES, "flash_attention_2", lambda: False)
    monkeypatch.setattr(vision_remember_attention, "varlen_attn", None)
    module = settings("flash_attention_2", 16)
    problems = vision_remember_attention.flash_problems(module, torch.empty(0, device="cpu", dtype=torch.bfloat16))
    assert "neither its package nor torch's own varlen kernels (torch.nn.attention.varlen) are here" in problems
    monkeypatch.setattr(vision_remember_attention, "varlen_attn", lambda *args, **kwargs: None)
    uses_torch_varlen = vision_remember_attention.uses_torch_varlen
    assert uses_torch_varlen("flash_attention_2") and not uses_torch_varlen("sdpa")


@FLASH_ATTN
@pytest.mark.parametrize("downsample_factor, interaction", [(3, "local"), (5, "local"), (3, "global")])
def test_flash_attention_equals_reference_on_gpu(downsample_factor, interaction):
    reference = blocks(downsample_factor, interaction, "eager", torch.bfloat16).cuda()
    fast = blocks(downsample_factor, interaction, "flash_attention_2", torch.bfloat16).cuda()
    inputs, hidden_states = context_inputs(reference, torch.bfloat16, "cuda")
    assert not vision_remember_attention.flash_problems(fast.layers["0"].self_attention.attention, hidden_states)
    with torch.no_grad():
        expected = reference.layers["0"](hidden_states, reference.prepare(*inputs))
        output = fast.layers["0"](hidden_states, fast.prepare(*inputs))
    torch.testing.assert_close(output, expected, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("device", DEVICES)
def test_small_host_tensors_reach_the_device_together_unchanged(device):
    """`to_device` packs tensors of any dtype and odd sizes into one copy; each comes back whole, in its place."""
    tensors = {
        "mask": torch.tensor([[True, False, True]]),
        "index": torch.arange(5) * 7,
        "lengths": torch.tensor([3, 1, 4], dtype=torch.int32),
        "weights": torch.tensor([[0.5], [1.0]], dtype=torch.bfloat16),
        "empty": torch.zeros(0, 2),
        "scalar": torch.tensor(-2),
    }
    moved = vision_remember.to_device(tensors, torch.device(device))
    assert list(moved) == list(tensors)
    for name, tensor in tensors.items():
        assert moved[name].device.type == device
        assert moved[name].dtype == tensor.dtype and torch.equal(moved[name].cpu(), tensor), name


@CUDA
@pytest.mark.parametrize("interaction", ["local", "global", "deformable"])
def test_prepare_and_blocks_never_wait_on_the_device(interaction):
    """Everything the blocks do after the layout is read is queued on the device without waiting for it: CUDA graphs
    and compiled graphs can capture it, and the host keeps launching while the device works."""
    downsample_factor = 5 if interaction == "deformable" else 3
    module = blocks(downsample_factor, interaction, "sdpa", torch.bfloat16).cuda()
    inputs, hidden_states = context_inputs(module, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            module.layers["0"](hidden_states, module.prepare(*inputs))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("interaction", ["local", "global"])
@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_attention_implementations_agree(device, interaction):
    """The tiny model's logits in bf16 with Vision Remember on SDPA, the Triton kernel and, on a GPU, FlashAttention
    (its package or torch's varlen kernels), against eager; the decoder and the tower keep their own implementation."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = active_model(interaction=interaction, image_grid_pinpoints=None).to(device, dtype)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.full((1, 40), 5)
    input_ids[0, 4:20] = model.config.image_token_id
    inputs = dict(input_ids=input_ids.to(device), pixel_values=torch.randn(1, 3, 36, 36, generator=generator))
    inputs["pixel_values"] = inputs["pixel_values"].to(device, dtype)
    flash = ["flash_attention_2"] if device == "cuda" and not MISSING_FOR_FLASH else []
    flash += [TRITON_WINDOWS] if vision_remember_triton.triton is not None and interaction == "local" else []
    logits = {}
    for implementation in ["eager", "sdpa", *flash]:
        model.config._attn_implementation = {"": implementation}  # the Vision Remember blocks' alone (a string would
        # reach the tower's and the decoder's configs too)
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits.float()
    assert set(logits) == {"eager", "sdpa", *flash}
    for implementation, values in logits.items():
        torch.testing.assert_close(values, logits["eager"], **TOLERANCES[dtype], msg=implementation)


@pytest.mark.skipif(vision_remember_triton.triton is None, reason="needs triton")
def test_triton_loads_as_any_attn_implementation(tmp_path):
    """`from_pretrained(..., attn_implementation="vision_remember_triton")`: the whole model takes the name (its
    decoder and tower run SDPA under it), the blocks run the kernel, and the logits are eager's."""
    active_model(image_grid_pinpoints=None).save_pretrained(tmp_path)
    model = VisionRememberForConditionalGeneration.from_pretrained(tmp_path, attn_implementation=TRITON_WINDOWS)
    assert model.config.text_config._attn_implementation == TRITON_WINDOWS
    input_ids = torch.full((1, 40), 5)
    input_ids[0, 4:20] = model.config.image_token_id
    inputs = dict(input_ids=input_ids, pixel_values=torch.randn(1, 3, 36, 36), prompt_mask=input_ids > 0)
    launches = []
    launch = vision_remember_triton.launch
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(vision_remember_triton, "launch", lambda *args: launches.append(1) or launch(*args))
        logits = model(**inputs).logits
        model.set_attn_implementation("eager")
        expected = model(**inputs).logits
    assert len(launches) == len(model.config.remember_after_layers)
    torch.testing.assert_close(logits, expected, **TOLERANCES[torch.float32])
