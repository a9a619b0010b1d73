"""Checkpoints saved under one supported Transformers (`tests/fixtures/checkpoints/`, see `checkpoint_fixtures`) load
under the Transformers under test, through their remote code (this checkout's `modeling/` files), in a fresh process
where `import vr_hf` fails, as from the Hub, and generate the tokens they generated when saved."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_fixtures import FAMILIES, FIXTURES, NEW_TOKENS, generation_inputs

import vr_hf.modeling


REMOTE_CODE = [path for path in Path(vr_hf.modeling.__file__).parent.glob("*.py") if path.name != "__init__.py"]
GENERATE = f"""
import json, sys
import torch
from transformers import AutoModelForImageTextToText

sys.modules["vr_hf"] = None  # only the folder's remote code can load the model
folder, inputs = sys.argv[1:]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
inputs = torch.load(inputs)
output = model.generate(**inputs, max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, do_sample=False)
print(json.dumps({{"module": type(model).__module__, "tokens": output[0, inputs["input_ids"].shape[1]:].tolist()}}))
"""


@pytest.mark.parametrize("name", FAMILIES)
def test_a_saved_checkpoint_generates_what_it_generated_when_saved(name, tmp_path):
    folder = shutil.copytree(FIXTURES / name, tmp_path / name)
    for code in REMOTE_CODE:
        shutil.copy(code, folder)
    torch.save(dict(generation_inputs(name, folder)), tmp_path / "inputs.pt")
    command = [sys.executable, "-c", GENERATE, str(folder), str(tmp_path / "inputs.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    generated = json.loads(result.stdout.splitlines()[-1])
    saved = json.loads((folder / "generated.json").read_text())
    assert generated["module"].startswith("transformers_modules")
    assert generated["tokens"] == saved["tokens"], f"saved under Transformers {saved['transformers']}: {saved}"
