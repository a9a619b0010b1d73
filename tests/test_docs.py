"""Every Python snippet in README.md and the docs runs as written: in a fresh folder, with what it reads made first
where it reads what an earlier command of its page writes."""

import re
from pathlib import Path

import pytest
import torch

from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer

from conftest import build_model


ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SNIPPETS = [
    pytest.param(snippet, id=f"{page.relative_to(ROOT)}-{number}")
    for page in PAGES
    for number, snippet in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


def aligned_checkpoint_and_adapter():
    """What the LoRA merge snippet reads: a phase-1 checkpoint and a (Q)LoRA adapter trained on it."""
    peft = pytest.importorskip("peft")
    from vr_hf.lora import lora_config

    model = build_model()
    model.save_pretrained("llava-vr-aligned")
    build_processor(model.config, byte_tokenizer()).save_pretrained("llava-vr-aligned")
    peft.get_peft_model(model, lora_config(model, rank=2)).save_pretrained("llava-vr-qlora")


# What a snippet reads, by a name it calls
INPUTS = {"merge_adapter_checkpoint(": aligned_checkpoint_and_adapter}


def test_the_docs_have_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("snippet", SNIPPETS)
def test_snippet_runs_as_written(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, make in INPUTS.items():
        if name in snippet:
            make()
    torch.manual_seed(0)
    exec(compile(snippet, "snippet", "exec"), {"__name__": "__main__"})
