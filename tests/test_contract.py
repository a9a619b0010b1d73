"""LLaVA-VR and the grafts on every generation and scoring path a native Transformers VLM supports, each against its
plain reference: the prefill's own logits, greedy decoding with a dynamic cache, the `input_ids` forward."""

from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    CompileConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vr_hf.backbones import BACKBONES, GRAFTS
from vr_hf.conversion import graft
from vr_hf.modeling import conversation_turns
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer

from conftest import active_model, build_model, prompt_end_unknown, random_image
from tiny_grafts import (
    ANSWER,
    END_OF_TURN,
    GENERATION_PROMPT,
    GRAFTED_CLASS,
    IMAGE_BLOCK,
    IMAGE_SIZES,
    PROMPT,
    QWEN,
    SETTINGS,
    image_inputs,
    left_padded,
    perturb,
    tiny_sources,
)


# LLaVA-VR with each rival of Vision Remember in its place (`test_rivals`) goes through the same contract
RIVALS = {
    "llava_vr+deepstack": dict(refusion="deepstack", remember_after_layers=[0, 1, 2]),
    "llava_vr+sva": dict(refusion="sva"),
    "llava_vr+tokenpacker": dict(projector_type="tokenpacker", use_vision_remember=False),
    "llava_vr+fastv": dict(fastv_layer=2, fastv_keep_ratio=0.5, use_vision_remember=False),
}
FAMILIES = list(BACKBONES) + list(RIVALS)
NEW_TOKENS = 4
NATIVE = {"llava_vr": LlavaNextForConditionalGeneration}
NATIVE.update({name: BACKBONES[name].native_head_class for name in GRAFTS})


@dataclass
class Family:
    """A model whose Vision Remember blocks matter, and how to write inputs for it."""

    name: str
    model: torch.nn.Module
    fresh: callable  # another model of the same architecture, other weights
    # (images, continuation=(), generation_prompt=True) -> one sample: the prompt with its images (ending in the chat
    # template's generation prompt, or not), then `continuation`
    inputs: callable
    batch: callable  # () -> two left-padded samples with an image each, ending in the generation prompt
    # (images, answers) -> one sample, a turn per image: a user message with the image, the generation prompt and,
    # where `answers` (token ids) has one, the answer and the end of the turn
    conversation: callable

    def two_images(self) -> dict:
        return self.inputs(self.images(2))

    def images(self, count: int) -> list:
        if self.name == "llava_vr":
            return [random_image(*size, seed=seed) for seed, size in enumerate(IMAGE_SIZES[self.name][:count], 1)]
        return [random_image(*size) for size in IMAGE_SIZES[self.name][:count]]

    def same_size_image(self, seed: int):
        return random_image(*IMAGE_SIZES[self.name][0], seed=seed)


def llava_family(**settings) -> Family:
    model = active_model(**settings)
    processor = build_processor(model.config, byte_tokenizer())

    def prompt(images, generation_prompt=True) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": "?"}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)

    def inputs(images, continuation=(), generation_prompt=True):
        batch = processor(images=images, text=[prompt(images, generation_prompt)], return_tensors="pt")
        continuation = torch.tensor([list(continuation)], dtype=torch.long)
        batch["input_ids"] = torch.cat([batch["input_ids"], continuation], dim=1)
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        return batch

    def batch():
        images = [random_image(40, 90, seed=1), random_image(80, 30, seed=2)]
        texts = [prompt(images[:1]), "Longer words first. " + prompt(images[1:])]
        return processor(images=images, text=texts, padding=True, return_tensors="pt")

    def conversation(images, answers):
        turns = [processor(images=[image], text=[prompt([image])], return_tensors="pt") for image in images]
        ids = []
        for index, turn in enumerate(turns):
            ids += turn["input_ids"][0].tolist() + (list(answers[index]) + END_OF_TURN if index < len(answers) else [])
        input_ids = torch.tensor([ids])
        pixels = {key: torch.cat([turn[key] for turn in turns]) for key in ("pixel_values", "image_sizes")}
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}

    return Family("llava_vr", model, lambda: build_model(seed=3, **settings), inputs, batch, conversation)


def graft_family(name: str, folder) -> Family:
    model = GRAFTED_CLASS[name].from_pretrained(folder).eval()
    perturb(model)

    def inputs(images, continuation=(), generation_prompt=True):
        answer = (GENERATION_PROMPT if generation_prompt else []) + list(continuation)
        return image_inputs(name, images, answer=answer)

    def batch():
        family_images = Family(name, None, None, None, None, None).images(2)
        samples = [image_inputs(name, family_images[:1], answer=GENERATION_PROMPT)]
        samples.append(image_inputs(name, family_images[1:], prompt=PROMPT * 3, answer=GENERATION_PROMPT))
        return left_padded(name, samples)

    def fresh():
        torch.manual_seed(3)
        return GRAFTED_CLASS[name](model.config).eval()

    def conversation(images, answers):
        text = []
        for index in range(len(images)):
            text += PROMPT + [IMAGE_BLOCK] + GENERATION_PROMPT
            text += list(answers[index]) + END_OF_TURN if index < len(answers) else []
        return image_inputs(name, images, text=text)

    return Family(name, model, fresh, inputs, batch, conversation)


@pytest.fixture(scope="module")
def graft_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    sources = tiny_sources(root)
    return {name: graft(sources[name], root / f"{name}-vr", **SETTINGS) for name in sources}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, graft_folders) -> Family:
    if request.param == "llava_vr":
        return llava_family()
    if request.param in RIVALS:
        return llava_family(**RIVALS[request.param])
    return graft_family(request.param, graft_folders[request.param])


def prefill_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def greedy(model, inputs, **kwargs) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **kwargs)


def assert_same_generation(model, inputs, **kwargs):
    """Greedy decoding with `kwargs` gives the tokens and logits of plain greedy decoding with a dynamic cache."""
    scored = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = model.generate(**inputs, **scored)
    output = model.generate(**inputs, **scored, **kwargs)
    assert torch.equal(output.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(output.logits), torch.stack(expected.logits))


def test_returned_sequences_and_beams_read_their_own_images(family):
    """Two images of different sizes in one sample: each returned sequence and each beam starts from the sample's own
    prefill (generation expands images per sequence; the Vision Remember features must follow them)."""
    inputs = family.two_images()
    expected = prefill_logits(family.model, inputs)
    sampled = family.model.generate(
        **inputs,
        do_sample=True,
        num_return_sequences=2,
        max_new_tokens=1,
        output_logits=True,
        return_dict_in_generate=True,
    )
    torch.testing.assert_close(sampled.logits[0], expected.expand(2, -1))
    beams = family.model.generate(**inputs, num_beams=2, num_return_sequences=2, max_new_tokens=1)
    assert torch.equal(beams[:, -1], expected.topk(2).indices.flatten())


def text_guided(model) -> bool:
    """Whether `model` has a text-guided token, which reads the prompt (the rivals of Vision Remember have none): only
    then can a reference that does not know where the prompt ends leak a continuation into it."""
    remember = model.model.vision_remember
    return remember is not None and remember.text_guidance


@contextmanager
def guidance_masks(model):
    """The guidance masks of the forward passes inside the block: each self-attention row's sample, and which of its
    positions feed the row's text-guided token."""
    masks, remember = [], model.model.vision_remember
    if remember is None or not remember.text_guidance:  # the rivals of Vision Remember have none
        yield None
        return
    prepare = remember.prepare

    def spy_prepare(layout, *args):
        masks.append((layout.guidance_rows, ~layout.unguided[..., 0]))
        return prepare(layout, *args)

    remember.prepare = spy_prepare
    try:
        yield masks
    finally:
        del remember.prepare


def test_static_cache_equals_dynamic_cache(family):
    """A static cache hands the model 4-D masks: padding and prompt still come from the 2-D mask generate was given."""
    batch = family.batch()
    assert not batch["attention_mask"].all(), "the batch must be left-padded for this test to mean anything"
    with guidance_masks(family.model) as masks:
        assert_same_generation(family.model, batch, cache_implementation="static")
    if masks is None:
        return
    (rows, dynamic), (_, static) = masks
    assert torch.equal(static, dynamic) and not static[batch["attention_mask"][rows] == 0].any()


def test_compiled_decoding_equals_eager(family):
    """A static cache compiles the decoding forward as one graph (`fullgraph=True` fails on any graph break)."""
    torch._dynamo.reset()  # the families share the decoder layers' code: each compiles it anew, past dynamo's limit
    inputs = family.inputs(family.images(1))
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # compile on the CPU too
    assert_same_generation(family.model, inputs, cache_implementation="static", compile_config=compile_config)
    assert hasattr(family.model, "_compiled_call"), "generate did not compile the decoding forward"


def test_assisted_decoding_equals_greedy(family):
    """The assistant gets the placeholders without the images and reads them as plain tokens; the model's first
    forward holds the prompt and the assistant's candidates, and only the prompt feeds the text-guided token."""
    inputs = family.inputs(family.images(1), generation_prompt=False)  # the prompt must not end in a known place
    if family.name == "minicpmv4_6":  # its Qwen3.5 decoder keeps a recurrent state: Transformers refuses assistants
        with pytest.raises(ValueError, match="not supported with stateful models"):
            greedy(family.model, inputs, assistant_model=family.fresh())
        return
    assistant = family.fresh()
    assistant.generation_config.suppress_tokens = [family.model.config.image_token_id]  # no candidate is an image
    assert_same_generation(family.model, inputs, assistant_model=assistant)


def test_prompt_lookup_and_chunked_prefill_are_refused():
    family = llava_family()
    inputs = family.inputs(family.images(1))
    with pytest.raises(ValueError, match="cannot generate with prompt_lookup_num_tokens: prompt lookup proposes"):
        greedy(family.model, inputs, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="cannot generate with prefill_chunk_size"):
        greedy(family.model, inputs, prefill_chunk_size=4)


def test_inputs_embeds_equal_input_ids(family):
    """Without `input_ids` the placeholders are found by their embedding, as native VLMs find them."""
    inputs = family.two_images()
    by_embedding = dict(inputs, inputs_embeds=family.model.get_input_embeddings()(inputs.pop("input_ids")))
    if family.name in QWEN:  # its 3-D rope positions need input_ids: hand them over, as its processor does
        ids = family.two_images()
        by_embedding["position_ids"] = family.model.model.get_rope_index(
            ids["input_ids"], image_grid_thw=ids["image_grid_thw"], mm_token_type_ids=ids["mm_token_type_ids"]
        )[0]
        inputs = ids
    else:
        inputs = family.two_images()
    everything = {"prompt_mask": torch.ones_like(inputs["input_ids"], dtype=torch.bool)}
    with torch.no_grad():
        expected = family.model(**inputs, **everything).logits
        torch.testing.assert_close(family.model(**by_embedding, **everything).logits, expected)
    if family.name == "llava_vr":
        generated = family.model.generate(**by_embedding, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(generated, greedy(family.model, inputs)[:, inputs["input_ids"].shape[1] :])


def test_image_features_follow_the_native_api(family):
    inputs = family.two_images()
    arguments = {"image_sizes": inputs.get("image_sizes")} if family.name == "llava_vr" else {}
    if family.name in QWEN:
        arguments = {"image_grid_thw": inputs["image_grid_thw"]}
    if family.name == "minicpmv4_6":
        arguments = {"target_sizes": inputs["target_sizes"]}
    outputs = family.model.get_image_features(inputs["pixel_values"], **arguments)
    assert isinstance(outputs, BaseModelOutputWithPooling)
    image_tokens = int((inputs["input_ids"] == family.model.config.image_token_id).sum())
    assert len(outputs.pooler_output) == 2 and sum(len(tokens) for tokens in outputs.pooler_output) == image_tokens
    if family.model.model.vision_remember is not None:
        assert len(outputs.remember_features) == len(outputs.window_index) == 2
    as_tuple = family.model.get_image_features(inputs["pixel_values"], **arguments, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], outputs.last_hidden_state)


def test_scoring_keeps_continuations_out_of_the_prompt(family):
    """(prompt, continuation) pairs scored without labels: the prompt ends after its generation prompt, so its logits
    are the prompt's alone, whatever follows."""
    images = family.images(1)
    prompt = family.inputs(images)
    length = prompt["input_ids"].shape[1]
    first, second = family.inputs(images, ANSWER), family.inputs(images, PROMPT)
    expected = family.model(**prompt).logits
    with torch.no_grad():
        for scored in (first, second):
            torch.testing.assert_close(family.model(**scored).logits[:, :length], expected)
        # A per-sample prompt_mask says the same; the reference pools the continuation too, and it leaks.
        prompt_mask = torch.ones(1, length, dtype=torch.bool)
        torch.testing.assert_close(family.model(**first, prompt_mask=prompt_mask).logits[:, :length], expected)
        with prompt_end_unknown(family.model):
            leaked = family.model(**first).logits[:, :length]
    if text_guided(family.model):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(leaked, expected)


def test_warns_where_it_cannot_tell_the_prompt(monkeypatch):
    """A warning where the text shows no generation prompt, and where labels leave a sample no prompt text."""
    warnings = []
    monkeypatch.setattr(conversation_turns.logger, "warning_once", warnings.append)
    family = llava_family()
    inputs = family.inputs(family.images(1), ANSWER)
    with torch.no_grad():
        family.model(**inputs)
        family.model(**family.inputs(family.images(1)))  # the prompt ends with the sequence
        assert not warnings
        no_prompt = dict(inputs, input_ids=inputs["input_ids"].clone())
        no_prompt["input_ids"][no_prompt["input_ids"] == family.model.config.generation_prompt_ids[0]] = 1
        family.model(**no_prompt)
        assert len(warnings) == 1 and "cannot tell where the prompt of a sample ends" in warnings[0]
        supervised = inputs["input_ids"] != family.model.config.image_token_id
        family.model(**inputs, labels=torch.where(supervised, inputs["input_ids"], -100))
        assert len(warnings) == 2 and "supervise more than its answers" in warnings[1]


def test_heads_declare_what_their_native_counterparts_declare(family):
    native = NATIVE[family.name]
    for attribute in ("_tp_plan", "_can_compile_fullgraph", "_supports_sdpa", "_supports_flash_attn"):
        assert getattr(type(family.model), attribute) == getattr(native, attribute), attribute


def test_a_training_batch_without_images_touches_every_parameter(family):
    """Text only, in training: the vision path runs on a stand-in image with zero weight, so every parameter gets a
    gradient (as DDP and ZeRO-3 need on every rank) and the outputs are the text model's own."""
    model = family.model
    input_ids = torch.tensor([PROMPT + ANSWER, ANSWER + PROMPT])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.train()
    try:
        output = model(**inputs, labels=input_ids)
        output.loss.backward()
    finally:
        model.eval()
    assert torch.equal(output.logits, expected)
    without = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    model.zero_grad(set_to_none=True)
    assert not without, f"no gradient reached {without}"


@pytest.mark.parametrize("name", ["llava_vr", "qwen2_5_vl"])
def test_the_decoder_with_vision_remember_compiles_as_one_graph(name, graft_folders):
    """The prefill's decoder, the Vision Remember blocks in its hooks included, compiled with `fullgraph=True` (any
    graph break fails): nothing in the blocks waits on the device, so they capture; its logits are the eager ones."""
    family = llava_family() if name == "llava_vr" else graft_family(name, graft_folders[name])
    inputs = family.two_images()
    with torch.no_grad():
        expected = family.model(**inputs).logits
        decoder = family.model.model.language_model
        decoder.compile(fullgraph=True, backend="eager")
        try:
            compiled = family.model(**inputs).logits
        finally:
            decoder._compiled_call_impl = None  # back to eager
    torch.testing.assert_close(compiled, expected)


DECODING_MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True),
    "beams": dict(num_beams=2),
    "assisted": dict(do_sample=False),
    "compiled": dict(do_sample=False, cache_implementation="static"),
}


@pytest.mark.parametrize("mode", DECODING_MODES)
def test_generation_returns_attentions_and_hidden_states_per_step(family, mode):
    """`output_attentions` and `output_hidden_states` through `generate()`, as native VLMs return them: one tuple per
    generated token, each with the decoder's per-layer attentions over the prompt (first step) or the new token."""
    inputs = family.inputs(family.images(1), generation_prompt=mode != "assisted")
    settings = dict(DECODING_MODES[mode])
    if mode == "assisted":
        if family.name == "minicpmv4_6":
            pytest.skip("its Qwen3.5 decoder keeps a recurrent state: Transformers refuses assistants")
        settings["assistant_model"] = family.fresh()
        settings["assistant_model"].generation_config.suppress_tokens = [family.model.config.image_token_id]
    if mode == "compiled":
        settings["compile_config"] = CompileConfig(backend="eager", fullgraph=True)
        settings["compile_config"]._compile_all_devices = True
    model = family.model
    model.set_attn_implementation("eager")
    try:
        output = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            output_attentions=True,
            output_hidden_states=True,
            return_dict_in_generate=True,
            **settings,
        )
    finally:
        model.set_attn_implementation("sdpa")
    text_config = model.config.text_config
    prompt_length = inputs["input_ids"].shape[1]
    assert len(output.attentions) == len(output.hidden_states) == NEW_TOKENS
    for step, (attentions, hidden_states) in enumerate(zip(output.attentions, output.hidden_states)):
        assert len(hidden_states) == text_config.num_hidden_layers + 1
        assert attentions and all(layer.shape[1] == text_config.num_attention_heads for layer in attentions)
        queries = attentions[0].shape[2]
        assert queries == prompt_length if step == 0 else queries >= 1
        assert hidden_states[0].shape[1] == queries


def answer_labels(input_ids: torch.Tensor, answers: list) -> torch.Tensor:
    """Labels on each answer, which starts right after the generation prompt of its turn."""
    labels = torch.full_like(input_ids, -100)
    width, ids = len(GENERATION_PROMPT), input_ids[0].tolist()
    starts = [end for end in range(width, len(ids) + 1) if ids[end - width : end] == GENERATION_PROMPT]
    for start, answer in zip(starts, answers):
        labels[0, start : start + len(answer)] = torch.tensor(answer)
    return labels


def test_a_later_turn_never_moves_an_earlier_turns_logits(family):
    """Two turns, image A then image B, both answers supervised: in training, nothing of the second turn (its image,
    its answer) moves a logit of the first turn, which generation computes before the second turn exists."""
    image_a, image_b, other_b = (family.same_size_image(seed) for seed in (1, 5, 6))
    answers, other_answers = [ANSWER, ANSWER[::-1]], [ANSWER, PROMPT]
    first = family.conversation([image_a, image_b], answers)
    first_turn = family.conversation([image_a], answers[:1])["input_ids"].shape[1]
    with torch.no_grad():
        expected = family.model(**first, labels=answer_labels(first["input_ids"], answers)).logits[:, :first_turn]
        for images, turn_answers in (([image_a, other_b], answers), ([image_a, image_b], other_answers)):
            inputs = family.conversation(images, turn_answers)
            logits = family.model(**inputs, labels=answer_labels(inputs["input_ids"], turn_answers)).logits
            torch.testing.assert_close(logits[:, :first_turn], expected, rtol=0, atol=0)
        # The reference: without turns (the prompt's end unknown), image A's tokens read image B's, and it leaks.
        with prompt_end_unknown(family.model):
            leaked = [family.model(**family.conversation([image_a, b], answers)).logits for b in (image_b, other_b)]
    if text_guided(family.model):
        assert not torch.allclose(leaked[0][:, :first_turn], leaked[1][:, :first_turn])


def test_teacher_forced_logits_equal_generated_ones_turn_by_turn(family):
    """Generate turn 1's answer, then turn 2's after it; a training forward over the whole conversation, labels on
    both answers, gives the logits generation gave, turn by turn."""
    image_a, image_b = family.same_size_image(1), family.same_size_image(5)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True)
    settings.update(return_dict_in_generate=True, suppress_tokens=[family.model.config.image_token_id])
    answers, generated_logits = [], []
    for turn in range(2):
        prompt = family.conversation([image_a, image_b][: turn + 1], answers)
        output = family.model.generate(**prompt, **settings)
        answers.append(output.sequences[0, prompt["input_ids"].shape[1] :].tolist())
        generated_logits.append(torch.stack(output.logits)[:, 0])
    conversation = family.conversation([image_a, image_b], answers)
    labels = answer_labels(conversation["input_ids"], answers)
    with torch.no_grad():
        logits = family.model(**conversation, labels=labels).logits[0]
    starts = (labels[0] != -100).int().diff(prepend=torch.zeros(1, dtype=torch.int)).eq(1).nonzero().flatten()
    assert len(starts) == 2
    for start, expected in zip(starts.tolist(), generated_logits):
        torch.testing.assert_close(logits[start - 1 : start - 1 + NEW_TOKENS], expected, atol=1e-5, rtol=1e-4)
