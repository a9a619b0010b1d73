"""Answer one question about one new image with the saved checkpoint, loaded as a user would load it."""

from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from .experiment import conversation
from .tasks import make_sample


def ask(checkpoint: str, output_dir: str, task: str = "text", seed: int = 12345) -> dict:
    sample = make_sample(task, np.random.default_rng(seed))
    image = Image.fromarray(sample.image)
    image_path = Path(output_dir) / "question.png"
    image.resize((4 * image.width, 4 * image.height), Image.NEAREST).save(image_path)

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    prompt = processor.apply_chat_template(conversation(sample.question), add_generation_prompt=True)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    return {"image": str(image_path), "question": sample.question, "answer": answer.strip(), "truth": sample.answer}
