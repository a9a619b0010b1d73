"""Every private Transformers API vr-hf overrides or calls, in one place, each with the reason no public API does.

`tests/test_transformers_private_api.py` checks each entry against the installed Transformers (the name is there, with
the parameters vr-hf relies on) and that no other private Transformers method is overridden anywhere in vr-hf; when an
upstream change breaks one, its failure names the entry and what vr-hf does with it.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PrivateUse:
    owner: str  # the Transformers class or module, by import path
    name: str
    parameters: tuple[str, ...] | None  # the parameters vr-hf passes or receives; None for an attribute
    where: str  # how vr-hf uses it
    reason: str  # why no public API does it


PRIVATE_API = (
    PrivateUse(
        "transformers.generation.utils.GenerationMixin",
        "_expand_multimodal_outputs",
        ("input_ids", "mm_encoder_output", "expand_size"),
        "overridden by VisionRememberForConditionalGenerationMixin",
        "generation regroups each image's `pooler_output` per beam and returned sequence here, and nowhere else: "
        "each image's Vision Remember features must follow it",
    ),
    PrivateUse(
        "transformers.generation.utils.GenerationMixin",
        "_validate_model_kwargs",
        ("model_kwargs",),
        "overridden by VisionRememberForConditionalGenerationMixin",
        "a grafted native head takes `prompt_mask` through its `**kwargs`, which this check refuses for arguments "
        "outside TransformersKwargs",
    ),
    PrivateUse(
        "transformers.modeling_utils.PreTrainedModel",
        "_init_weights",
        ("module",),
        "overridden by VisionRememberPreTrainedMixin and VisionRememberPreTrainedModel",
        "the place Transformers documents for a model's own initialisation (every native model overrides it)",
    ),
    PrivateUse(
        "transformers.modeling_utils.PreTrainedModel",
        "is_custom_code",
        (),
        "overridden by VisionRememberPreTrainedMixin",
        "Transformers skips, for remote code, every module without parameters of its own, and with it the nested "
        "vision tower's own initialisation scheme; these models initialise through transformers.initialization",
    ),
    PrivateUse(
        "transformers.modeling_utils.PreTrainedModel",
        "_no_split_modules",
        None,
        "narrowed by VisionRememberPreTrainedMixin.post_init",
        "what shards or places a model by class (FSDP's auto-wrap policy, a device map) reads the classes here, and "
        "a composite model collects them from its sub-models, some of which it does not have (SigLIP's text part)",
    ),
    PrivateUse(
        "transformers.configuration_utils.PreTrainedConfig",
        "_attn_implementation",
        None,
        "read by the Vision Remember blocks from the model's config",
        "the attention implementation the model was loaded with, read as every native attention module reads it",
    ),
    PrivateUse(
        "transformers.processing_utils.ProcessorMixin",
        "_get_arguments_from_pretrained",
        ("pretrained_model_name_or_path",),
        "overridden by vr_hf.processor.without_video",
        "a grafted checkpoint's stock processor loads its video processor here, which needs torchvision",
    ),
    PrivateUse(
        "transformers.cli.serving.model_manager.ModelManager",
        "_load_processor",
        ("model_id_and_revision", "gguf_file"),
        "replaced by vr_hf.serve for `vr-hf serve`",
        "Transformers' server loads processors here with AutoProcessor, which needs torchvision for a grafted "
        "checkpoint's stock processor: vr-hf loads them its one way (vr_hf.processor.load_processor)",
    ),
    PrivateUse(
        "transformers.cli.serving.server",
        "build_server",
        ("model_manager",),
        "wrapped by vr_hf.serve for `vr-hf serve`",
        "the server's app is built here and nowhere else: vr-hf adds a handler that answers bad input (a ValueError) "
        "with a 400 instead of a 500",
    ),
    PrivateUse(
        "transformers.models.auto.modeling_auto",
        "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
        None,
        "extended by vr_hf.serve for `vr-hf serve`",
        "Transformers' server loads a model through AutoModelForMultimodalLM only if its model type is listed here "
        "(otherwise by its architecture's name in the transformers namespace, which remote code is not in)",
    ),
    PrivateUse(
        "transformers.generation.configuration_utils.CompileConfig",
        "_compile_all_devices",
        None,
        "set by tests/test_contract.py",
        "generate compiles only on accelerators; the tests compile the decoding forward on the CPU",
    ),
)
