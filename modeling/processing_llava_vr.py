"""Processor for Vision Remember models: AnyRes images (no torchvision needed), text with one image token per
vision token, and a ChatML chat template whose `{% generation %}` markers make assistant-only loss work."""

from transformers.processing_utils import ProcessorMixin

from .image_layout import ImageLayout


CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts -%}{{ part['text'] }}{%- endfor -%}{{ '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '<|im_end|>' }}"
    "{%- endif -%}{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


class VisionRememberProcessor(ProcessorMixin):
    r"""
    Wraps an image processor (`LlavaNextImageProcessor` for AnyRes, any single-view one such as `SiglipImageProcessor`
    otherwise) and a tokenizer. Each image placeholder in the text becomes exactly as many image tokens as the model
    makes vision tokens for that image.

    Args:
        image_processor: The image processor.
        tokenizer: The tokenizer; it must know `image_token`.
        tokens_per_side (`int`): Vision tokens per side of one view, the model config's `tokens_per_side`.
        chat_template (`str`, *optional*): Defaults to a ChatML template with `{% generation %}` markers.
        image_token (`str`, *optional*, defaults to `"<|image_pad|>"`): The placeholder token.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        tokens_per_side: int = 8,
        chat_template: str | None = None,
        image_token: str = "<|image_pad|>",
        **kwargs,
    ):
        self.tokens_per_side = tokens_per_side
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer does not know image_token={image_token!r}: add it as a special token. (It holds "
                f"{len(tokenizer)} tokens; one loaded from a folder that lacks its tokenizer.json holds almost none.)"
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE, **kwargs)

    @property
    def image_layout(self) -> ImageLayout:
        size = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        view_size = size.height or size.shortest_edge
        grid_pinpoints = getattr(self.image_processor, "image_grid_pinpoints", None)
        return ImageLayout(self.tokens_per_side, view_size, grid_pinpoints)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        image_sizes = image_inputs.get("image_sizes")
        image_size = None if image_sizes is None else image_sizes[image_idx]
        return self.image_token * self.image_layout.num_tokens(image_size)


__all__ = ["VisionRememberProcessor"]
