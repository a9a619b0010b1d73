"""Checkpoints saved under one supported Transformers, by an earlier vr-hf (`tests/fixtures/checkpoints/`, see
`checkpoint_fixtures`; their `auto_map` may name files this vr-hf has renamed), load under the Transformers under test
with vr-hf's own classes, and generate the tokens they generated when saved."""

import json

import pytest
from checkpoint_fixtures import FAMILIES, FIXTURES, generate, generation_inputs
from transformers import AutoModelForImageTextToText

from vr_hf.backbones import BACKBONES


@pytest.mark.parametrize("name", FAMILIES)
def test_a_saved_checkpoint_generates_what_it_generated_when_saved(name):
    folder = FIXTURES / name
    saved = json.loads((folder / "generated.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(model) is BACKBONES[name].head_class
    assert generate(model, generation_inputs(name, folder)) == saved["tokens"], (
        f"saved under Transformers {saved['transformers']}, this checkpoint generated {saved['tokens']}"
    )
