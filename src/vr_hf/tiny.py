"""Tiny, randomly initialised parts that need no download: for tests, examples and CPU benchmarks."""

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .modeling.configuration_llava_vr import VisionRememberConfig
from .modeling.processing_llava_vr import CHAT_TEMPLATE
from .processor import generation_prompt_ids


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]


def byte_tokenizer(
    special_tokens: list[str] = SPECIAL_TOKENS, eos_token: str = "<|im_end|>", pad_token: str = "<|endoftext|>"
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens, then `special_tokens`, by default the Qwen2-VL ones): real encoding,
    tiny vocabulary."""
    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(byte_to_unicode))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token=pad_token, padding_side="left"
    )


@cache
def byte_generation_prompt_ids() -> tuple[int, ...]:
    """`<|im_start|>assistant\n` in the byte tokenizer's ids: the generation prompt of the processor's template."""
    return tuple(generation_prompt_ids(byte_tokenizer(), CHAT_TEMPLATE))


# The tiny SigLIP tower and Qwen2 decoder every tiny model is made of (and, scaled up, the CPU benchmark's)
TINY_VISION = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=36,
    patch_size=3,
    vision_use_head=False,
)
TINY_TEXT = dict(
    model_type="qwen2",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)


def tiny_config(**overrides) -> VisionRememberConfig:
    """A SigLIP + Qwen2 model small enough to train on a CPU in seconds: 12x12 patches, 4x4 tokens per view."""
    tokenizer_vocab = 256 + len(SPECIAL_TOKENS)
    settings = dict(
        vision_config=TINY_VISION,
        text_config=dict(TINY_TEXT, vocab_size=tokenizer_vocab, pad_token_id=256, eos_token_id=258),
        image_token_id=tokenizer_vocab - 1,
        downsample_factor=3,
        vision_feature_layers=[1, 2, 3],
        remember_after_layers=[0, 2],
        cross_attention_heads=4,
        generation_prompt_ids=list(byte_generation_prompt_ids()),
        image_grid_pinpoints=[[36, 72], [72, 36], [72, 72]],
        pad_token_id=256,
        eos_token_id=258,
    )
    settings.update(overrides)
    return VisionRememberConfig(**settings)
