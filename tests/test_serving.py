"""`vr-hf serve`: Transformers' own server, started on 127.0.0.1 with tiny checkpoints of the three families, answers
chat completions with images (data URLs and local files, several per message, streamed or not, concurrently) as the
same model's `generate()` does, answers bad requests with a 400 and the reason, and goes on serving."""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vr_hf import VisionRememberForConditionalGeneration
from vr_hf.backbones import BACKBONES, GRAFTS
from vr_hf.processor import build_processor, load_processor
from vr_hf.tiny import byte_tokenizer, tiny_config

from conftest import random_image
from tiny_grafts import IMAGE_SIZES, grafted_checkpoint


openai = pytest.importorskip("openai", reason="needs the serve extra: pip install -e '.[serve]'")

NEW_TOKENS = 5
CONTEXT = 256


def answering_llava(folder):
    """A tiny LLaVA-VR whose answers change with the image (wide random weights), in ASCII, with a short context."""
    tiny = tiny_config()
    wide = dict(initializer_range=0.3)
    config = tiny_config(
        identity_init=False,
        vision_config=dict(tiny.vision_config.to_dict(), **wide),
        text_config=dict(tiny.text_config.to_dict(), max_position_embeddings=CONTEXT, **wide),
    )
    torch.manual_seed(0)
    model = VisionRememberForConditionalGeneration(config)
    model.generation_config.suppress_tokens = list(range(128, config.text_config.vocab_size))
    model.save_pretrained(folder)
    build_processor(config, byte_tokenizer()).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    grafts = {name: grafted_checkpoint(root, name) for name in GRAFTS}
    return {"llava_vr": answering_llava(root / "llava_vr"), **grafts}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """A server serving whatever checkpoint a request names, stopped by its process id afterwards."""
    port, log = free_port(), tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "vr_hf.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen([*command, "--device", "cpu"], stdout=output, stderr=subprocess.STDOUT)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                assert process.poll() is None, log.read_text()
                time.sleep(0.5)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def message(images: list, text: str = "What is in the picture?", url=data_url) -> dict:
    return {
        "role": "user",
        "content": [
            *({"type": "image_url", "image_url": {"url": url(image)}} for image in images),
            {"type": "text", "text": text},
        ],
    }


def expected_answer(folder: str, images: list, text: str = "What is in the picture?") -> str:
    """The same model's own `generate()`, greedy, on the prompt its chat template makes."""
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    content = [*({"type": "image", "image": image} for image in images), {"type": "text", "text": text}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def ask(client, folder: str, messages: list, **settings):
    return client.chat.completions.create(
        model=folder, messages=messages, max_tokens=NEW_TOKENS, temperature=0, **settings
    )


@pytest.mark.parametrize("name", list(BACKBONES))
def test_answers_a_chat_completion_with_an_image_as_generate_does(client, checkpoints, name):
    image = random_image(*IMAGE_SIZES[name][0], seed=1)
    answer = ask(client, checkpoints[name], [message([image])])
    assert answer.choices[0].message.content == expected_answer(checkpoints[name], [image])


def test_local_files_several_images_streaming_and_concurrent_requests(client, checkpoints, tmp_path):
    folder = checkpoints["llava_vr"]
    images = [random_image(40, 90, seed=seed) for seed in range(3)]
    expected = [expected_answer(folder, [image]) for image in images]
    assert len(set(expected)) == len(expected), "the answers must tell the images apart for this test to mean anything"

    path = tmp_path / "image.png"
    images[0].save(path)
    from_file = ask(client, folder, [message([images[0]], url=lambda image: str(path))])
    assert from_file.choices[0].message.content == expected[0]

    both = ask(client, folder, [message(images[:2], "Compare them.")])
    assert both.choices[0].message.content == expected_answer(folder, images[:2], "Compare them.")

    stream = ask(client, folder, [message([images[1]])], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected[1]

    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(lambda image: ask(client, folder, [message([image])]), images))
    assert [answer.choices[0].message.content for answer in answers] == expected


@pytest.mark.parametrize(
    "messages, reason",
    [
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            "Incorrect image source",
        ),
        (
            [
                message([random_image(40, 90)]),
                {
                    "role": "assistant",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(random_image(40, 90))}},
                        {"type": "text", "text": "A"},
                    ],
                },
                {"role": "user", "content": "And?"},
            ],
            "number of <|image_pad|> tokens",
        ),
        ([message([random_image(40, 90)], "word " * CONTEXT)], "past the model's context of 256"),
    ],
    ids=["unreadable image", "more images than placeholders", "prompt past the context"],
)
def test_bad_requests_get_a_400_with_the_reason_and_the_server_goes_on(client, checkpoints, messages, reason):
    folder = checkpoints["llava_vr"]
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, folder, messages)
    assert refused.value.status_code == 400 and reason in json.dumps(refused.value.body)
    assert ask(client, folder, [message([random_image(40, 90, seed=1)])]).choices[0].message.content
