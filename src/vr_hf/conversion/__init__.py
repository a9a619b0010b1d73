"""Build LLaVA-VR checkpoints from pretrained parts."""

from .build import ConversionError, build_from_parts


__all__ = ["ConversionError", "build_from_parts"]
