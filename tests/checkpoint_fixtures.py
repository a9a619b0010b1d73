"""Saved checkpoints that must survive upgrades: a tiny checkpoint of every family (`vr_hf.backbones`), as
`save_pretrained` wrote them under one supported Transformers and the vr-hf of the day, with the tokens each then
generated from fixed inputs (`tests/fixtures/checkpoints/`). `tests/test_saved_checkpoints.py` loads them under the
Transformers under test and checks those tokens.

The folders hold what a saved checkpoint holds but its remote code, which belongs to the vr-hf that saved it: the test
loads them with this vr-hf's classes, as vr-hf's own commands do.

To add a family's, or write one again (after a change that cannot load the old one, which then needs its own
migration): `python tests/checkpoint_fixtures.py NAME...`, under the oldest supported Transformers.
"""

import json
import shutil
import sys
from pathlib import Path

import torch
import transformers


sys.path.insert(0, str(Path(__file__).parent))
from vr_hf.backbones import BACKBONES  # noqa: E402
from vr_hf.conversion import graft  # noqa: E402
from vr_hf.processor import build_processor, load_processor  # noqa: E402
from vr_hf.tiny import byte_tokenizer  # noqa: E402

from conftest import active_model, conversation, random_image  # noqa: E402
from tiny_grafts import (  # noqa: E402
    GENERATION_PROMPT,
    GRAFTED_CLASS,
    IMAGE_SIZES,
    SETTINGS,
    image_inputs,
    perturb,
    tiny_sources,
)


FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
FAMILIES = list(BACKBONES)
NEW_TOKENS = 6


def generation_inputs(name: str, folder: Path) -> dict:
    """The fixed inputs each checkpoint generates from: one image and a question, ending in the generation prompt."""
    if name == "llava_vr":
        processor = load_processor(str(folder))
        prompt = processor.apply_chat_template(conversation("What is in the picture?"), add_generation_prompt=True)
        return processor(images=[random_image(40, 90, seed=1)], text=[prompt], return_tensors="pt")
    return image_inputs(name, [random_image(*IMAGE_SIZES[name][0], seed=1)], answer=GENERATION_PROMPT)


def generate(model, inputs: dict) -> list[int]:
    output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def save(root: Path, scratch: Path, names: list[str]):
    """Write the checkpoints of the families `names` under `root`, without their remote code, and the tokens each
    generates."""
    sources = tiny_sources(scratch)
    for name in names:
        if name == "llava_vr":
            model = active_model()
        else:
            model = GRAFTED_CLASS[name].from_pretrained(graft(sources[name], scratch / f"{name}-vr", **SETTINGS))
            perturb(model)
        folder = root / name
        shutil.rmtree(folder, ignore_errors=True)
        model.save_pretrained(folder)
        if name == "llava_vr":
            build_processor(model.config, byte_tokenizer()).save_pretrained(folder)
        else:
            byte_tokenizer().save_pretrained(folder)
        for code in folder.glob("*.py"):
            code.unlink()
        tokens = generate(model.eval(), generation_inputs(name, folder))
        record = {"transformers": transformers.__version__, "torch": torch.__version__, "tokens": tokens}
        (folder / "generated.json").write_text(json.dumps(record, indent=2) + "\n")
        print(name, record)


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        save(FIXTURES, Path(scratch), sys.argv[1:] or FAMILIES)
