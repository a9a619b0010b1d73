"""Training: phase settings (what trains), the LLaVA-JSON converter, and one TRL SFTTrainer step on the tiny model."""

import json
import math

import pytest
import torch
from PIL import Image

from vr_hf.backbones import GRAFTS
from vr_hf.data import LoadReport, load_llava_json
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer, tiny_config
from vr_hf.training import (
    PARTS,
    PHASE_2,
    parameters_by_part,
    part_parameters,
    trainable_parameter_groups,
    trainable_parts,
)

from conftest import build_model, conversation, random_image


# ---------------------------------------------------------------------------------------------- phase settings


def test_phase_1_step_changes_only_trainable_parts(processor, images):
    model = build_model().train()
    groups = trainable_parameter_groups(model, {"projector": 1e-2, "vision_remember": 1e-2})
    assert [group["name"] for group in groups] == ["projector", "vision_remember"]
    assert trainable_parts(model) == {
        "vision_tower": False,
        "projector": True,
        "vision_remember": True,
        "language_model": False,
        "lm_head": False,
    }
    trainable = {id(p) for group in groups for p in group["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(groups)
    texts = [
        processor.apply_chat_template(conversation("What is it?", "A red square."), tokenize=False),
        processor.apply_chat_template(conversation("Colour?", "Blue."), tokenize=False),
    ]
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    for name, p in model.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    prefixes = {
        "projector": ("model.multi_modal_projector.", "model.image_newline"),
        "vision_remember": ("model.vision_remember.",),
    }
    for part, starts in prefixes.items():
        # Vision Remember's output projections start at zero, so in step 1 only they move: the part as a whole changes
        assert any(name.startswith(starts) for name in changed), f"{part} did not change"


def test_unknown_part_and_phases():
    model = build_model()
    with pytest.raises(ValueError, match="Unknown part.*'projecter'.*choose from"):
        trainable_parameter_groups(model, {"projecter": 1e-3})
    with pytest.raises(ValueError, match="Unknown phase"):
        trainable_parameter_groups(model, 3)
    with pytest.raises(ValueError, match="no 'vision_remember' part"):
        part_parameters(build_model(use_vision_remember=False), "vision_remember")

    groups = trainable_parameter_groups(model, 2)
    assert [group["name"] for group in groups] == ["projector", "vision_remember", "language_model"]  # lm_head is tied
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert model.lm_head.weight.requires_grad
    everything = trainable_parameter_groups(model, dict.fromkeys(PARTS, 1e-4))
    ids = [id(p) for group in everything for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------- LLaVA JSON


def write_llava(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    random_image(20, 30, seed=3).save(folder / "good.png")
    random_image(30, 20, seed=4).save(folder / "good2.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    rows = [
        {
            "id": "ok",
            "image": "good.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "Noise."},
                {"from": "human", "value": "Sure?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {
            "id": "missing",
            "image": "nope.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {
            "id": "corrupt",
            "image": "corrupt.png",
            "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "no-answer", "image": "good.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {
            "id": "no-placeholder",
            "image": "good2.png",
            "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Noise."}],
        },
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path, folder


def test_llava_json_skip_reports_bad_rows(tmp_path):
    path, folder = write_llava(tmp_path)
    dataset, report = load_llava_json(path, folder)
    assert isinstance(report, LoadReport)
    assert (report.rows_read, report.rows_kept, report.text_only_rows, report.rows_skipped) == (6, 3, 1, 3)
    assert report.counts == {"missing_image": 1, "unreadable_image": 1, "no_assistant_turn": 1}
    assert report.skipped_ids("missing_image") == ["missing"]
    assert report.skipped_ids("unreadable_image") == ["corrupt"]
    assert report.skipped_ids("no_assistant_turn") == ["no-answer"]
    assert "missing" in str(report) and "nope.png" in str(report)

    assert dataset.column_names == ["id", "images", "messages"]
    ok, text, no_placeholder = dataset
    assert ok["id"] == "ok" and len(ok["images"]) == 1 and isinstance(ok["images"][0], Image.Image)
    assert ok["images"][0].size == (30, 20)
    assert [m["role"] for m in ok["messages"]] == ["user", "assistant", "user", "assistant"]
    assert [part["type"] for part in ok["messages"][0]["content"]] == ["image", "text"]
    assert ok["messages"][0]["content"][1]["text"] == "What is this?"
    assert ok["messages"][1]["content"] == [{"type": "text", "text": "Noise."}]
    assert text["images"] == [] and [p["type"] for p in text["messages"][0]["content"]] == ["text"]
    assert [part["type"] for part in no_placeholder["messages"][0]["content"]] == ["image", "text"]


@pytest.mark.parametrize(
    "bad_id, reason", [("missing", "does not exist"), ("corrupt", "cannot be read"), ("no-answer", "no assistant")]
)
def test_llava_json_raise_names_the_row(tmp_path, bad_id, reason):
    path, folder = write_llava(tmp_path)
    rows = [row for row in json.loads(path.read_text()) if row["id"] in ("ok", "text", bad_id)]
    path.write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=f"Row '{bad_id}'.*{reason}"):
        load_llava_json(path, folder, on_error="raise")
    with pytest.raises(ValueError, match="on_error"):
        load_llava_json(path, folder, on_error="ignore")


def test_llava_json_images_are_read_beside_it_and_a_wrong_folder_is_refused(tmp_path):
    path, folder = write_llava(tmp_path)
    beside = folder / "data.json"  # the images' own folder: found without image_folder
    beside.write_text(path.read_text())
    _, report = load_llava_json(beside)
    assert report.rows_kept == 3 and report.text_only_rows == 1
    with pytest.raises(ValueError, match="None of the 4 rows with images .* read relative to .*Is that where"):
        load_llava_json(path)  # the images are not beside this one: only the text-only row would be left
    path.write_text(json.dumps([{"id": "q", "conversations": [{"from": "human", "value": "Hi"}]}]))
    with pytest.raises(ValueError, match="No row of .* can be trained on"):
        load_llava_json(path)


# ---------------------------------------------------------------------------------------------- TRL SFTTrainer


def run_sft_step(tmp_path_factory, from_folder: bool = False):
    """One SFTTrainer step (assistant-only loss) on the tiny model, recording what reaches `model.model`. With
    `from_folder`, the trainer gets the saved checkpoint's path and loads model and processor with remote code."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    torch.manual_seed(0)
    config = tiny_config()
    from vr_hf import VisionRememberForConditionalGeneration

    model = VisionRememberForConditionalGeneration(config)
    processor = build_processor(config, byte_tokenizer())
    rows = [
        {"images": [random_image(40, 90, seed=1)], "messages": conversation("What is it?", "Noise, mostly.")},
        {"images": [random_image(80, 30, seed=2)], "messages": conversation("Colour?", "Grey.")},
    ]
    dataset = datasets.Dataset.from_list(rows)

    trainer_inputs = dict(model=model, processing_class=processor)
    if from_folder:
        folder = tmp_path_factory.mktemp("checkpoint")
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        trainer_inputs = dict(model=str(folder))
    args = trl.SFTConfig(
        output_dir=str(tmp_path_factory.mktemp("sft")),
        trust_remote_code=from_folder,
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=None,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(args=args, train_dataset=dataset, **trainer_inputs)

    calls = []
    base = trainer.model.model
    original_forward = base.forward
    original_prepare = base.vision_remember.prepare

    def spy_forward(*args, **kwargs):
        calls.append({"args": len(args), "kwargs": dict(kwargs), "guidance": []})
        return original_forward(*args, **kwargs)

    def spy_prepare(layout, features, window_index):
        if calls:
            calls[-1]["guidance"].append(~layout.unguided[..., 0])
        return original_prepare(layout, features, window_index)

    base.forward = spy_forward
    base.vision_remember.prepare = spy_prepare
    try:
        result = trainer.train()
    finally:
        del base.forward
        del base.vision_remember.prepare
    batch = trainer.data_collator([dict(row) for row in dataset])
    return {"trainer": trainer, "result": result, "calls": calls, "batch": batch, "config": config}


@pytest.fixture(scope="module")
def sft_step(tmp_path_factory):
    """Plain TRL: what SFTTrainer does to a Vision Remember model out of the box."""
    return run_sft_step(tmp_path_factory)


def test_sft_trainer_loads_a_checkpoint_path_with_remote_code(sft_step, tmp_path_factory):
    """`SFTTrainer(model=path)` with `trust_remote_code=True`: the same model and processor, so the same step."""
    from_folder = run_sft_step(tmp_path_factory, from_folder=True)
    assert type(from_folder["trainer"].model).__name__ == "VisionRememberForConditionalGeneration"
    assert from_folder["calls"][0]["guidance"], "Vision Remember did not run in the training step"
    losses = [
        [entry["loss"] for entry in step["trainer"].state.log_history if "loss" in entry]
        for step in (sft_step, from_folder)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_sft_step_loss_is_finite(sft_step):
    losses = [entry["loss"] for entry in sft_step["trainer"].state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(sft_step["result"].training_loss)
    assert sft_step["trainer"].state.global_step == 1


def test_sft_collator_puts_no_loss_on_images_or_prompt(sft_step):
    batch, config = sft_step["batch"], sft_step["config"]
    labels, input_ids = batch["labels"], batch["input_ids"]
    is_image = input_ids == config.image_token_id
    assert is_image.any()
    assert (labels[is_image] == -100).all()
    assert (labels[batch["attention_mask"] == 0] == -100).all()
    tokenizer = sft_step["trainer"].processing_class.tokenizer
    for row_ids, row_labels, answer in zip(input_ids, labels, ["Noise, mostly.", "Grey."]):
        supervised = row_labels != -100
        first = int(supervised.nonzero()[0])
        assert not supervised[:first].any()  # the whole prompt, image tokens included, is unsupervised
        assert tokenizer.decode(row_ids[supervised]) == answer + "<|im_end|>"


def test_sft_step_calls_the_base_model(sft_step):
    calls = sft_step["calls"]
    assert len(calls) == 1 and calls[0]["args"] == 0
    # What TRL 1.16's fused LM head passes to model.model: the collator's keys minus labels, plus use_cache=False
    assert set(calls[0]["kwargs"]) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "use_cache"}
    assert calls[0]["guidance"], "Vision Remember did not run in the training step"


def assert_answers_stay_out_of_the_text_guided_token(step):
    call = step["calls"][0]
    labels = step["batch"]["labels"]
    answer_and_after = (labels != -100).cumsum(dim=-1) > 0
    assert call["guidance"]
    for guidance in call["guidance"]:
        assert guidance.shape == labels.shape
        assert not guidance[answer_and_after].any(), "the text-guided token pools answer tokens"
        assert guidance[~answer_and_after & (step["batch"]["attention_mask"] == 1)].any()


def test_sft_step_keeps_answers_out_of_the_text_guided_token(sft_step):
    """TRL's fused LM head keeps `labels` and calls `model.model` without them; the head hands them over."""
    assert_answers_stay_out_of_the_text_guided_token(sft_step)


# ---------------------------------------------------------------------------------------------- grafted backbones

# Where each backbone keeps its parts, written out independently of `vr_hf.backbones`
GRAFT_PARTS = {
    "qwen2_5_vl": {
        "vision_tower": ("model.visual.patch_embed.", "model.visual.blocks."),
        "projector": ("model.visual.merger.",),
    },
    "qwen3_vl": {
        "vision_tower": ("model.visual.patch_embed.", "model.visual.pos_embed.", "model.visual.blocks."),
        "projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    },
    "minicpmv4_6": {
        "vision_tower": (
            "model.vision_tower.embeddings.",
            "model.vision_tower.encoder.",
            "model.vision_tower.post_layernorm.",
        ),
        "projector": ("model.vision_tower.vit_merger.", "model.merger."),
    },
}
SHARED_PARTS = {
    "vision_remember": ("model.vision_remember.",),
    "language_model": ("model.language_model.",),
    "lm_head": ("lm_head.",),
}


@pytest.fixture(scope="module")
def grafted(tmp_path_factory):
    """Tiny grafted checkpoints of every backbone (`tiny_grafts.tiny_sources`)."""
    from vr_hf.conversion import graft

    from tiny_grafts import SETTINGS, tiny_sources

    root = tmp_path_factory.mktemp("grafted")
    return {name: graft(source, root / f"{name}-vr", **SETTINGS) for name, source in tiny_sources(root).items()}


def part_of(backbone: str, name: str) -> str:
    parts = {**GRAFT_PARTS[backbone], **SHARED_PARTS}
    owners = [part for part, prefixes in parts.items() if name.startswith(prefixes)]
    assert len(owners) == 1, f"{name} belongs to {owners}"
    return owners[0]


@pytest.mark.parametrize("backbone", GRAFTS)
def test_every_parameter_of_a_graft_is_in_its_part(grafted, backbone):
    from tiny_grafts import GRAFTED_CLASS

    model = GRAFTED_CLASS[backbone].from_pretrained(grafted[backbone])
    expected = {part: set() for part in PARTS}
    for name, parameter in model.named_parameters():
        expected[part_of(backbone, name)].add(id(parameter))
    assert {part: {id(p) for p in parameters} for part, parameters in parameters_by_part(model).items()} == expected
    bare = parameters_by_part(model.model)  # a bare base model: the same parts, without the head
    assert {part: len(parameters) for part, parameters in bare.items()} == {
        part: 0 if part == "lm_head" else len(ids) for part, ids in expected.items()
    }


@pytest.mark.parametrize("backbone", GRAFTS)
@pytest.mark.parametrize("phase, parts", [(1, {"projector", "vision_remember"}), (2, set(PHASE_2))])
def test_phase_step_on_a_graft_changes_exactly_its_parts(grafted, backbone, phase, parts):
    from test_graft import random_image as graft_image

    from tiny_grafts import GRAFTED_CLASS, IMAGE, IMAGE_SIZES, image_inputs

    model = GRAFTED_CLASS[backbone].from_pretrained(grafted[backbone]).train()
    size = IMAGE_SIZES[backbone][0]
    inputs = image_inputs(backbone, graft_image(*size))
    labels = torch.where(inputs["input_ids"] == IMAGE, -100, inputs["input_ids"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    optimizer = torch.optim.AdamW(trainable_parameter_groups(model, phase))
    for _ in range(2):  # Vision Remember's zero output projections move first, the rest of it in the second step
        model(**inputs, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert {part_of(backbone, name) for name in changed} == parts
    for part in parts:
        owned = {name for name in before if part_of(backbone, name) == part}
        assert changed & owned, f"{part} did not change"


@pytest.mark.parametrize(
    "name, text, where",
    [("data.json", '[{"id": 1,}]', "line 1, column 11"), ("data.jsonl", '{"id": 1}\n{"id": 2', "line 2")],
)
def test_unparseable_data_files_are_refused_with_where(tmp_path, name, text, where):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{name} is not valid JSON at {where}: "):
        load_llava_json(path)
