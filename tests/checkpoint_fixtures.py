"""Saved checkpoints that must survive upgrades: a tiny LLaVA-VR, Qwen2.5-VL with Vision Remember and MiniCPM-V 4.6
with Vision Remember, as `save_pretrained` wrote them under one supported Transformers, with the tokens each then
generated from fixed inputs (`tests/fixtures/checkpoints/`). `tests/test_saved_checkpoints.py` loads them under the
Transformers under test and checks those tokens.

The folders hold what a saved checkpoint holds but its remote code: the test adds this checkout's `modeling/` files, so
that the code under test is the checkout's and the repository holds one copy of it.

To write them again (after a change that may not load old checkpoints, which then needs its own migration):
`python tests/checkpoint_fixtures.py`, under the oldest supported Transformers.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoProcessor


sys.path.insert(0, str(Path(__file__).parent))
from vr_hf.processor import build_processor  # noqa: E402
from vr_hf.tiny import byte_tokenizer  # noqa: E402

from conftest import active_model, conversation, random_image  # noqa: E402
from tiny_grafts import GENERATION_PROMPT, GRAFT, GRAFTED_CLASS, SETTINGS, image_inputs, perturb, tiny_sources  # noqa: E402


FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
FAMILIES = ["llava_vr", "qwen2_5_vl", "minicpmv4_6"]
NEW_TOKENS = 6


def generation_inputs(name: str, folder: Path) -> dict:
    """The fixed inputs each checkpoint generates from: one image and a question, ending in the generation prompt."""
    if name == "llava_vr":
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        prompt = processor.apply_chat_template(conversation("What is in the picture?"), add_generation_prompt=True)
        return processor(images=[random_image(40, 90, seed=1)], text=[prompt], return_tensors="pt")
    size = (56, 84) if name == "qwen2_5_vl" else (32, 48)
    return image_inputs(name, [random_image(*size, seed=1)], answer=GENERATION_PROMPT)


def generate(model, inputs: dict) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def save(root: Path, scratch: Path):
    """Write every family's checkpoint under `root`, without its remote code, and the tokens it generates."""
    models = {"llava_vr": active_model()}
    sources = tiny_sources(scratch)
    for name in ("qwen2_5_vl", "minicpmv4_6"):
        grafted = GRAFT[name](sources[name], scratch / f"{name}-vr", **SETTINGS)
        models[name] = GRAFTED_CLASS[name].from_pretrained(grafted)
        perturb(models[name])
    for name, model in models.items():
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        if name == "llava_vr":
            build_processor(model.config, byte_tokenizer()).save_pretrained(folder)
        else:
            byte_tokenizer().save_pretrained(folder)
        tokens = generate(model.eval(), generation_inputs(name, folder))
        for code in folder.glob("*.py"):
            code.unlink()
        record = {"transformers": transformers.__version__, "torch": torch.__version__, "tokens": tokens}
        (folder / "generated.json").write_text(json.dumps(record, indent=2) + "\n")
        print(name, record)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        save(FIXTURES, Path(scratch))
