"""`vr-hf serve CHECKPOINT`: any vr-hf checkpoint behind Transformers' own OpenAI-compatible server.

`transformers serve` loads a model class by its architecture's name in the `transformers` namespace, and tells a VLM
by where its class sits in the Auto mappings: it knows no remote-code class. This command runs that same server, with
every option of `transformers serve` (`vr-hf serve --help` lists them), after telling it what it needs:

- vr-hf's model types are multimodal language models, which the server loads through `AutoModelForMultimodalLM`;
- a checkpoint's processor loads as everywhere in vr-hf (`vr_hf.processor.load_processor`), so a grafted checkpoint's
  stock processor works without torchvision;
- a request with inputs the model refuses (an unreadable image, more images than the text has placeholders, a prompt
  past the context) is answered 400 with the reason, as the OpenAI API answers it, and the server goes on serving.
"""

import functools
import sys

from transformers import AutoModelForMultimodalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

from .backbones import BACKBONES
from .processor import load_processor


def register_with_the_server():
    """Make Transformers' server load vr-hf checkpoints like native multimodal models."""
    from transformers.cli.serving import model_manager, server

    for backbone in BACKBONES.values():
        AutoModelForMultimodalLM.register(backbone.config_class, backbone.head_class, exist_ok=True)
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES[backbone.model_type] = backbone.head_class.__name__
    model_manager.ModelManager._load_processor = load_served_processor
    server.build_server = answering_bad_requests(server.build_server)


def load_served_processor(manager, model_id_and_revision: str, gguf_file: str | None = None):
    model_id, _, revision = model_id_and_revision.partition("@")
    return load_processor(model_id, revision=revision or None)


def answering_bad_requests(build_server):
    """`build_server`, whose app answers a `ValueError` (bad input, as Transformers raises it) with a 400."""

    @functools.wraps(build_server)
    def build(*args, **kwargs):
        from fastapi.responses import JSONResponse

        app = build_server(*args, **kwargs)

        async def bad_request(request, error: ValueError):
            return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error"}}, status_code=400)

        app.add_exception_handler(ValueError, bad_request)
        return app

    return build


def main(argv: list[str]):
    """`transformers serve` with `--trust-remote-code`, for vr-hf checkpoints."""
    from transformers.cli.transformers import app

    register_with_the_server()
    app(["serve", *argv, "--trust-remote-code"], prog_name="vr-hf serve")


if __name__ == "__main__":
    main(sys.argv[1:])
