"""lmms-eval's entry point for vr-hf (`lmms_eval.models` in pyproject.toml): the model is imported only when used."""

from lmms_eval.models.registry_v2 import ModelManifest


MANIFEST = ModelManifest(model_id="vr_hf", simple_class_path="vr_hf.evaluation.lmms_model.VisionRememberLMMS")
