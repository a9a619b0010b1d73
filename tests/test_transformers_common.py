"""Transformers' own common model tests (`ModelTesterMixin`, `GenerationTesterMixin`, `ConfigTester`), applied to
LLaVA-VR the way Transformers applies them to LLaVA-NeXT. They come from the source distribution of the Transformers
under test (`transformers_suites`)."""

import unittest
from contextlib import contextmanager
from unittest.mock import patch

import torch

from vr_hf import VisionRememberConfig, VisionRememberForConditionalGeneration, VisionRememberModel
from vr_hf.modeling.image_layout import ImageLayout
from vr_hf.tiny import tiny_config

import transformers_suites


modeling_common = transformers_suites.load("test_modeling_common")
ConfigTester = transformers_suites.load("test_configuration_common").ConfigTester
GenerationTesterMixin = transformers_suites.load("generation.test_utils").GenerationTesterMixin
ModelTesterMixin, floats_tensor, ids_tensor = (
    modeling_common.ModelTesterMixin,
    modeling_common.floats_tensor,
    modeling_common.ids_tensor,
)


IMAGE_SIZES = [(36, 36), (20, 72), (72, 20)]  # one per sample: AnyRes tiles, unpadded rows and columns
PROMPT, ANSWER = 2, 3  # text tokens before the image, and supervised after it


class VisionRememberModelTester:
    def __init__(self, parent):
        self.parent = parent
        self.is_training = True
        config = self.get_config()
        self.batch_size = len(IMAGE_SIZES)
        self.text_config, self.vision_config = config.text_config.to_dict(), config.vision_config.to_dict()
        self.vocab_size = config.text_config.vocab_size
        self.hidden_size = config.text_config.hidden_size
        self.num_hidden_layers = config.text_config.num_hidden_layers
        self.num_attention_heads = config.text_config.num_attention_heads
        self.image_size = config.vision_config.image_size
        self.patch_size = config.vision_config.patch_size
        layout = ImageLayout.from_config(config)
        self.image_tokens = [layout.num_tokens(size) for size in IMAGE_SIZES]
        self.max_views = max(layout.num_views(size) for size in IMAGE_SIZES)
        self.seq_length = PROMPT + max(self.image_tokens) + ANSWER

    def get_config(self) -> VisionRememberConfig:
        """`tiny_config` with the mixin's 2-layer limit: 2 vision layers, 2 decoder layers, Vision Remember after
        the first."""
        tiny = tiny_config()
        return tiny_config(
            vision_config=dict(tiny.vision_config.to_dict(), num_hidden_layers=2),
            text_config=dict(tiny.text_config.to_dict(), num_hidden_layers=2, layer_types=None),
            vision_feature_layers=[1, 2],
            remember_after_layers=[0],
            identity_init=False,
            image_token_id=0,  # a low id, which the embedding-resizing tests keep as they shrink the vocabulary
        )

    def prepare_config_and_inputs_for_common(self):
        config = self.get_config()
        input_ids = 1 + ids_tensor([self.batch_size, self.seq_length], 255)  # byte tokens, never the image token
        attention_mask = torch.ones_like(input_ids)
        labels = torch.full_like(input_ids, -100)
        for row, count in enumerate(self.image_tokens):
            padding = self.seq_length - (PROMPT + count + ANSWER)
            attention_mask[row, :padding] = 0  # left-padded, as for generation
            input_ids[row, :padding] = config.pad_token_id
            input_ids[row, padding + PROMPT : padding + PROMPT + count] = config.image_token_id
            labels[row, -ANSWER:] = input_ids[row, -ANSWER:]
        pixel_values = floats_tensor([self.batch_size, self.max_views, 3, self.image_size, self.image_size])
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_sizes=torch.tensor(IMAGE_SIZES),
            labels=labels,
        )
        return config, inputs


class VisionRememberForConditionalGenerationModelTest(ModelTesterMixin, GenerationTesterMixin, unittest.TestCase):
    all_model_classes = (VisionRememberModel, VisionRememberForConditionalGeneration)
    pipeline_model_mapping = {"image-text-to-text": VisionRememberForConditionalGeneration}
    test_pruning = False
    test_head_masking = False
    is_multimodal = True
    supports_sdpa = True
    _is_composite = True
    # AnyRes: the tower's `last_hidden_state` has one row per view, not per image (as for LLaVA-NeXT-style models)
    skip_test_image_features_output_shape = True

    def setUp(self):
        self.model_tester = VisionRememberModelTester(self)
        self.config_tester = ConfigTester(self, config_class=VisionRememberConfig, has_text_modality=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @contextmanager
    def head_only(self):
        """The mixin runs its loss tests on every class but native base models, which it finds in Transformers' own
        mapping: this remote-code base model is not there, so leave it out the same way."""
        with patch.object(self, "all_model_classes", (VisionRememberForConditionalGeneration,)):
            yield

    def test_training(self):
        with self.head_only():
            super().test_training()

    def test_training_gradient_checkpointing(self):
        with self.head_only():
            super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        with self.head_only():
            super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        with self.head_only():
            super().test_training_gradient_checkpointing_use_reentrant_true()
