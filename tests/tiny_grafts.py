"""Tiny native checkpoints of every backbone Vision Remember grafts onto (Qwen2.5-VL, Qwen3-VL, MiniCPM-V 4.6), and
their inputs, built offline.

The stock processors of all three need torchvision for their video part, which this CPU environment lacks: the inputs
are built as the processors build them, from their own image processors (`...ImageProcessorPil`) and the placeholder
expansion they apply (one image token per vision token, between the image start and end tokens).
"""

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen3VLConfig,
)
from transformers.models.minicpmv4_6 import MiniCPMV4_6Config
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from vr_hf.backbones import BACKBONES, GRAFTS
from vr_hf.conversion import graft
from vr_hf.modeling.processing_llava_vr import CHAT_TEMPLATE
from vr_hf.modeling.vision_remember import OutputProjection
from vr_hf.tiny import SPECIAL_TOKENS, byte_generation_prompt_ids, byte_tokenizer


IMAGE, VIDEO, START, END = 290, 291, 292, 293
TEXT = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
SETTINGS = dict(remember_after_layers=[0, 2], cross_attention_heads=4)
GRAFTED_CLASS = {name: BACKBONES[name].head_class for name in GRAFTS}
QWEN = ("qwen2_5_vl", "qwen3_vl")  # the backbones whose inputs Qwen2-VL's image processor builds
# Two image sizes each family's tiny model takes: patches of 14 merged 2x2 (Qwen), of 4 (MiniCPM-V), AnyRes (LLaVA-VR)
IMAGE_SIZES = {
    "llava_vr": [(40, 90), (80, 30)],
    "qwen2_5_vl": [(56, 84), (28, 56)],
    "qwen3_vl": [(56, 84), (28, 56)],
    "minicpmv4_6": [(32, 48), (48, 32)],
}
PROMPT = [1, 2, 3]
ANSWER = [5, 6, 7]
GENERATION_PROMPT = list(byte_generation_prompt_ids())  # the sources' ChatML `<|im_start|>assistant\n`
END_OF_TURN = byte_tokenizer()("<|im_end|>\n")["input_ids"]
IMAGE_BLOCK = -1  # in `image_inputs`' text: where the next image's placeholder block goes


def native_configs() -> dict:
    """Tiny native configs of every grafted backbone."""
    qwen = Qwen2_5_VLConfig(
        text_config=dict(
            TEXT, num_key_value_heads=2, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]}
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[2],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    minicpm = MiniCPMV4_6Config(
        text_config=dict(
            TEXT,
            model_type="qwen3_5_text",
            num_key_value_heads=2,
            head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, patch_size=4
        ),
        insert_layer_id=1,
        image_size=64,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
    )
    qwen3 = Qwen3VLConfig(
        text_config=dict(
            TEXT,
            num_key_value_heads=2,
            head_dim=16,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=4,
            patch_size=14,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    return {"qwen2_5_vl": qwen, "qwen3_vl": qwen3, "minicpmv4_6": minicpm}


def tiny_sources(root) -> dict:
    """Tiny random native checkpoints, saved as `save_pretrained` writes them, with a ChatML tokenizer."""
    torch.manual_seed(0)
    configs = native_configs()
    folders = {}
    for name in GRAFTS:
        folders[name] = root / name
        BACKBONES[name].native_head_class(configs[name]).save_pretrained(folders[name])
        tokenizer = byte_tokenizer()
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(folders[name])
    return folders


def coded_image(rows: int, cols: int, patch: int) -> Image.Image:
    """Every `patch x patch` block holds its own (row, column) in the red and green channels."""
    grid = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), axis=-1)
    pixels = np.concatenate([grid, np.zeros((rows, cols, 1), dtype=grid.dtype)], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels.repeat(patch, axis=0).repeat(patch, axis=1))


def image_inputs(
    backbone: str, images, raw: bool = False, mode: str = "16x", prompt=PROMPT, answer=ANSWER, text=None
) -> dict:
    """One sample: pixel values as the backbone's image processor lays them out, and as `input_ids` `text`, token ids
    with `IMAGE_BLOCK` where each image's expanded placeholder block goes (by default `prompt`, every image's block,
    `answer`)."""
    images = images if isinstance(images, list) else [images]
    text = text or prompt + [IMAGE_BLOCK] * len(images) + answer
    if backbone in QWEN:
        processor = Qwen2VLImageProcessorPil(do_resize=False, do_rescale=not raw, do_normalize=not raw)
        pixels = dict(processor(images, return_tensors="pt"))
        tokens = (pixels["image_grid_thw"].prod(dim=-1) // 4).tolist()
    else:
        processor = MiniCPMV4_6ImageProcessorPil(patch_size=4)
        arrays = [np.asarray(image, dtype=np.float32).transpose(2, 0, 1) for image in images]
        arrays = [array if raw else (array / 255 - 0.5) / 0.5 for array in arrays]
        patches = np.concatenate([processor.reshape_by_patch(array, 4) for array in arrays], axis=-1)
        sizes = torch.tensor([[array.shape[1] // 4, array.shape[2] // 4] for array in arrays])
        pixels = {"pixel_values": torch.from_numpy(patches)[None], "target_sizes": sizes, "downsample_mode": mode}
        tokens = (sizes.prod(dim=-1) // (16 if mode == "16x" else 4)).tolist()
    blocks = iter([START] + [IMAGE] * count + [END] for count in tokens)
    input_ids = torch.tensor([[token for item in text for token in (next(blocks) if item == IMAGE_BLOCK else [item])]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}
    if backbone in QWEN:
        inputs["mm_token_type_ids"] = (input_ids == IMAGE).int()
    return inputs


def tensors(inputs: dict) -> dict:
    return {name: value for name, value in inputs.items() if isinstance(value, torch.Tensor)}


def perturb(model):
    """Random output projections: Vision Remember then changes the logits, as a trained one does."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutputProjection):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)


def left_padded(backbone: str, samples: list[dict]) -> dict:
    """One batch of single-sample `image_inputs`, left-padded as the backbones' processors pad for generation."""
    length = max(sample["input_ids"].shape[1] for sample in samples)

    def pad(key: str, value: int = 0) -> torch.Tensor:
        rows = [
            torch.nn.functional.pad(sample[key], (length - sample[key].shape[1], 0), value=value) for sample in samples
        ]
        return torch.cat(rows)

    batch = {key: pad(key) for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in samples[0]}
    if backbone in QWEN:
        for key in ("pixel_values", "image_grid_thw"):
            batch[key] = torch.cat([sample[key] for sample in samples])
    else:
        batch["pixel_values"] = torch.cat([sample["pixel_values"] for sample in samples], dim=-1)
        batch["target_sizes"] = torch.cat([sample["target_sizes"] for sample in samples])
        batch["downsample_mode"] = samples[0]["downsample_mode"]
    return batch


MINICPM_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "image_start_token": "<image>",
    "image_end_token": "</image>",
    "slice_start_token": "<slice>",
    "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>",
    "image_id_end_token": "</image_id>",
}


def source_tokenizer(name: str):
    """A byte tokenizer with the special tokens of the backbone's processor and a ChatML template."""
    extra = dict(MINICPM_TOKENS) if name == "minicpmv4_6" else {}
    special = list(dict.fromkeys(SPECIAL_TOKENS + ["<|video_pad|>"] + list(extra.values())))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer(special_tokens=special).backend_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra,
    )
    image_part = "'<|vision_start|><|image_pad|><|vision_end|>'" if name in QWEN else "'<|image_pad|>'"
    tokenizer.chat_template = CHAT_TEMPLATE.replace("'<|vision_start|><|image_pad|><|vision_end|>'", image_part)
    return tokenizer


def grafted_checkpoint(root, name: str):
    """The tiny native checkpoint of test_graft with what a real one carries besides its weights (tokenizer, image
    processor, chat template), grafted, with Vision Remember made active."""
    source = tiny_sources(root / name)[name]
    tokenizer = source_tokenizer(name)
    tokenizer.save_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    ids = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
    if name in QWEN:
        ids.update(vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
        Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84).save_pretrained(source)
    else:
        MiniCPMV4_6ImageProcessorPil(patch_size=4, scale_resolution=32, max_slice_nums=2).save_pretrained(source)
    for field, token in ids.items():
        setattr(config, field, tokenizer.convert_tokens_to_ids(token))
    config.save_pretrained(source)
    folder = graft(source, root / f"{name}-vr", **SETTINGS)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    perturb(model)
    model.save_pretrained(folder)
    return str(folder)
