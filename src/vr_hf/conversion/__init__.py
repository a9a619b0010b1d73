"""Build LLaVA-VR checkpoints from pretrained parts; graft Vision Remember onto native VLM checkpoints and strip it."""

from ..checkpoints import ConversionError
from .build import build_from_parts
from .grafting import graft, strip_vision_remember


__all__ = ["ConversionError", "build_from_parts", "graft", "strip_vision_remember"]
