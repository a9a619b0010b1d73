"""Vision Remember for Hugging Face Transformers.

The classes load on first use (`vr_hf.VisionRememberConfig`, ...), which imports `vr_hf.modeling` and registers them
with the Auto classes, in this process (`AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`, `AutoProcessor`)
and for the Hub: `save_pretrained` then writes the `auto_map` and copies the remote-code files, so the saved folder
loads with `trust_remote_code=True` without this package. Commands that need no model (`vr-hf --help`) start at once.
"""

import importlib
import logging


# bitsandbytes warns at import, on every machine without its optional `kernels` package, that its CPU 4-bit kernel
# falls back to the reference implementation: vr-hf runs 4-bit only under --qlora, where the fallback is expected.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def __getattr__(name: str):
    """The classes of `vr_hf.modeling` (`vr_hf.VisionRememberConfig`, ...), loaded on first use."""
    modeling = importlib.import_module(".modeling", __name__)
    if name in modeling.__all__:
        return getattr(modeling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
