"""Build LLaVA-VR from a config, save it as a remote-code checkpoint, reload it with `trust_remote_code`, generate.

Runs offline on a CPU in seconds with a tiny random model: `python examples/quickstart.py [output_dir]`.
"""

import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer, tiny_config


def main(output_dir: str):
    torch.manual_seed(0)
    config = tiny_config()  # or VisionRememberConfig() for the paper's SigLIP-L/16-384 + Qwen2-0.5B at ratio 1/9
    model = VisionRememberForConditionalGeneration(config)
    processor = build_processor(config, byte_tokenizer())
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)

    model = AutoModelForImageTextToText.from_pretrained(output_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(output_dir, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 96, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    vision_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    print(f"saved and reloaded {type(model).__name__} from {output_dir} ({model.num_parameters():,} parameters)")
    print(f"image {image.size[0]}x{image.size[1]} -> {vision_tokens} vision tokens; untrained answer: {answer!r}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="llava-vr-"))
