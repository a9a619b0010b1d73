import os
from contextlib import contextmanager

import torch


if not torch.cuda.is_available():  # Triton kernels run on CPU tensors, interpreted (read when a kernel is defined)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.modeling.vision_remember import OutputProjection
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer, tiny_config


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def conversation(question: str, answer: str | None = None, image: bool = True) -> list[dict]:
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def build_model(seed: int = 0, **config_overrides) -> VisionRememberForConditionalGeneration:
    torch.manual_seed(seed)
    return VisionRememberForConditionalGeneration(tiny_config(**config_overrides)).eval()


def active_model(seed: int = 0, **config_overrides) -> VisionRememberForConditionalGeneration:
    """A model whose Vision Remember blocks (if it has them) change the logits clearly, as a trained one's do."""
    model = build_model(seed, identity_init=False, **config_overrides)
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, OutputProjection):
                module.weight.normal_(std=0.5)
    return model


@contextmanager
def prompt_end_unknown(model):
    """The reference that the no-leak tests compare with: a model that cannot tell where a prompt ends (no
    generation prompt, no labels) lets all of a sample's text feed its text-guided token."""
    known = model.config.generation_prompt_ids
    model.config.generation_prompt_ids = None
    try:
        yield
    finally:
        model.config.generation_prompt_ids = known


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The models here are tiny: intra-op threads only add synchronisation, and slow everything down on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def processor(tokenizer):
    return build_processor(tiny_config(), tokenizer)


@pytest.fixture(scope="session")
def images():
    """A wide and a tall image: AnyRes tiles with unpadded columns and rows."""
    return [random_image(40, 90, seed=1), random_image(80, 30, seed=2)]


@pytest.fixture(scope="session")
def prompt_batch(processor, images):
    """Two prompts of different lengths, left-padded, each with one image."""
    prompts = [
        processor.apply_chat_template(conversation("What is in the picture?"), add_generation_prompt=True),
        processor.apply_chat_template(conversation("Colour?"), add_generation_prompt=True),
    ]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")
