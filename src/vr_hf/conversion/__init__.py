"""Build LLaVA-VR checkpoints from pretrained parts; graft Vision Remember onto native VLM checkpoints and strip it."""

from .build import ConversionError, build_from_parts
from .graft import graft_minicpmv4_6, graft_qwen2_5_vl, strip_vision_remember


__all__ = ["ConversionError", "build_from_parts", "graft_minicpmv4_6", "graft_qwen2_5_vl", "strip_vision_remember"]
