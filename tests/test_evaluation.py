"""lmms-eval's `vr_hf` model on tiny LLaVA-VR and grafted Qwen2.5-VL / Qwen3-VL / MiniCPM-V checkpoints, the offline
tasks, and `vr-hf evaluate`. Skipped where lmms-eval is not installed (docs/evaluation.md says how to install it)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers.utils import is_torchvision_available

from vr_hf.backbones import BACKBONES, GRAFTS
from vr_hf.cli import main
from vr_hf.demo.compare import TEST_SEED
from vr_hf.demo.settings import Settings
from vr_hf.demo.tasks import make_split
from vr_hf.processor import build_processor
from vr_hf.tiny import byte_tokenizer, tiny_config

from conftest import active_model, prompt_end_unknown, random_image
from tiny_grafts import grafted_checkpoint, tiny_sources


lmms_eval = pytest.importorskip("lmms_eval", reason="needs lmms-eval: see docs/evaluation.md")
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from vr_hf.evaluation import TASKS_DIR, paper  # noqa: E402
from vr_hf.evaluation.lmms_model import VisionRememberLMMS, generation_settings  # noqa: E402
from vr_hf.evaluation.tasks import easy_vqa_docs, red_item_docs  # noqa: E402


KINDS = list(BACKBONES)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation")
    config = tiny_config()
    llava = root / "llava_vr"
    active_model().save_pretrained(llava)
    build_processor(config, byte_tokenizer()).save_pretrained(llava)
    return {"llava_vr": str(llava), **{name: grafted_checkpoint(root, name) for name in GRAFTS}}


@pytest.fixture(scope="module")
def docs():
    """Two questions about images of different sizes, as lmms-eval's task_dict holds them."""
    return [
        {"image": random_image(40, 90, seed=1), "question": "What is in the picture?"},
        {"image": random_image(60, 30, seed=2), "question": "Colour?"},
    ]


def load(checkpoints, kind: str, docs, batch_size: int = 2) -> VisionRememberLMMS:
    lm = VisionRememberLMMS(checkpoints[kind], batch_size=batch_size)
    lm.task_dict = {"toy": {"test": docs}}
    return lm


def doc_to_visual(doc):
    return [doc["image"]]


def request(kind: str, doc_id: int, *arguments) -> Instance:
    metadata = {"task": "toy", "doc_id": doc_id, "repeats": 1}
    if kind == "loglikelihood":
        context, continuation = arguments
        arguments = (context, continuation, doc_to_visual, doc_id, "toy", "test")
    else:
        context, generation_kwargs = arguments
        arguments = (context, generation_kwargs, doc_to_visual, doc_id, "toy", "test")
    return Instance(request_type=kind, arguments=arguments, idx=0, metadata=metadata)


def prompt_inputs(lm: VisionRememberLMMS, doc: dict, extra_tokens: list[int] = ()):
    """The inputs of the prompt for one document, built as a user builds them, with `extra_tokens` appended."""
    prompt = lm.chat_prompt([doc["image"]], doc["question"])
    inputs = lm.processor(images=[doc["image"]], text=[prompt], return_tensors="pt")
    if extra_tokens:
        extra = torch.tensor([list(extra_tokens)])
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    return inputs


def test_lmms_eval_finds_the_model_through_the_entry_point():
    from lmms_eval.models import get_model

    assert get_model("vr_hf") is VisionRememberLMMS


@pytest.mark.parametrize("kind", KINDS)
def test_the_continuation_never_feeds_the_text_guided_token(checkpoints, docs, kind):
    """Two continuations that share a prefix get the same log-probabilities on it, bit for bit: what follows the
    prefix, like the rest of the continuation, never reaches the vision tokens. A forward that lets the whole text feed
    the text-guided token tells them apart."""
    lm = load(checkpoints, kind, docs)
    prompt = lm.chat_prompt([docs[0]["image"]], docs[0]["question"])
    circle, square = (lm.tokenize(text) for text in (" a red circle", " a red square"))
    shared = len(lm.tokenize(" a red "))
    assert len(circle) == len(square) and circle[:shared] == square[:shared] and circle[shared] != square[shared]
    first, _ = lm.continuation_log_probs(prompt, [docs[0]["image"]], [circle])
    second, _ = lm.continuation_log_probs(prompt, [docs[0]["image"]], [square])
    assert torch.equal(first[:, :shared], second[:, :shared])

    def everything_guides(tokens: list[int]) -> torch.Tensor:
        inputs = prompt_inputs(lm, docs[0], tokens)
        return lm.model(**inputs).logits[0, -len(tokens) - 1 : -1]

    with torch.no_grad(), prompt_end_unknown(lm.model):
        leaked = [everything_guides(tokens) for tokens in (circle, square)]
    assert not torch.equal(leaked[0][:shared], leaked[1][:shared]), "Vision Remember must be active for this test"


def generation_nll(model, inputs, tokens: list[int]) -> float:
    """The continuation's negative log-likelihood as `generate` sees it when forced to produce it."""
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(
        **inputs,
        max_new_tokens=len(tokens),
        do_sample=False,
        prefix_allowed_tokens_fn=lambda _, ids: [tokens[len(ids) - prompt_length]],
        output_logits=True,
        return_dict_in_generate=True,
    )
    log_probs = torch.stack(output.logits, dim=1)[0].log_softmax(-1)
    return -float(log_probs[torch.arange(len(tokens)), tokens].sum())


@pytest.mark.parametrize("kind", KINDS)
def test_loglikelihood_is_what_generation_predicts(checkpoints, docs, kind):
    lm = load(checkpoints, kind, docs)
    continuation = " a red circle"
    ((nll, greedy),) = [
        score.text for score in lm.loglikelihood([request("loglikelihood", 0, docs[0]["question"], continuation)])
    ]
    assert nll == pytest.approx(
        generation_nll(lm.model, prompt_inputs(lm, docs[0]), lm.tokenize(continuation)), abs=1e-3
    )
    assert not greedy


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_continuations_are_flagged(checkpoints, docs, kind):
    lm = load(checkpoints, kind, docs)
    with torch.no_grad():
        log_probs = lm.model(**prompt_inputs(lm, docs[0])).logits[0, -1].log_softmax(-1)
    prompt = lm.chat_prompt([docs[0]["image"]], docs[0]["question"])
    best, worst = int(log_probs.argmax()), int(log_probs.argmin())
    (best_nll, best_greedy), (worst_nll, worst_greedy) = lm.score(prompt, [docs[0]["image"]], [[best], [worst]])
    assert best_greedy and not worst_greedy
    assert best_nll == pytest.approx(-float(log_probs[best]), abs=1e-4)
    assert worst_nll == pytest.approx(-float(log_probs[worst]), abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_loglikelihood_batches_like_single_requests(checkpoints, docs, kind):
    """Continuations of different lengths share a forward pass, right-padded, with the same scores as alone."""
    requests = [request("loglikelihood", 0, docs[0]["question"], text) for text in ("A", "circle", "no")]
    requests.append(request("loglikelihood", 1, docs[1]["question"], "red"))
    batched = [score.text for score in load(checkpoints, kind, docs, batch_size=3).loglikelihood(requests)]
    single = [score.text for score in load(checkpoints, kind, docs, batch_size=1).loglikelihood(requests)]
    assert [greedy for _, greedy in batched] == [greedy for _, greedy in single]
    np.testing.assert_allclose([nll for nll, _ in batched], [nll for nll, _ in single], rtol=1e-5)
    assert all(nll > 0 for nll, _ in batched)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_until_answers_as_generate_does(checkpoints, docs, kind):
    """Batched requests (left-padded, images of different sizes) get the answers `generate` gives each alone."""
    lm = load(checkpoints, kind, docs)
    settings = {"max_new_tokens": 4, "temperature": 0}
    answers = lm.generate_until(
        [request("generate_until", index, doc["question"], settings) for index, doc in enumerate(docs)]
    )
    expected = []
    for doc in docs:
        inputs = prompt_inputs(lm, doc)
        output = lm.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        expected.append(
            lm.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        )
    assert answers == expected


def test_generate_until_stops_at_until(checkpoints, docs):
    lm = load(checkpoints, "llava_vr", docs)
    settings = {"max_new_tokens": 6, "temperature": 0}
    full = lm.generate_until([request("generate_until", 0, docs[0]["question"], settings)])[0]
    stop = full[2:4]
    assert len(stop) == 2, "the tiny model must answer with more than 4 characters for this test"
    cut = lm.generate_until([request("generate_until", 0, docs[0]["question"], dict(settings, until=[stop]))])[0]
    assert cut == full.split(stop)[0]


def test_generation_settings_follow_lmms_eval():
    assert generation_settings({}) == ({"max_new_tokens": 128, "num_beams": 1, "do_sample": False}, [])
    greedy, until = generation_settings({"temperature": 0, "do_sample": True, "until": "\n\n", "max_new_tokens": 5})
    assert greedy == {"max_new_tokens": 5, "num_beams": 1, "do_sample": False} and until == ["\n\n"]
    sampled, _ = generation_settings({"temperature": 0.7, "top_p": 0.9, "image_aspect_ratio": "pad"})
    assert sampled == {"max_new_tokens": 128, "num_beams": 1, "do_sample": True, "temperature": 0.7, "top_p": 0.9}


def test_generate_until_multi_round_asks_each_round(checkpoints, docs):
    """Round 0 asks the request's context; each next round asks what the task's doc_to_text returns."""
    lm = load(checkpoints, "llava_vr", docs)
    settings = {"max_new_tokens": 3, "temperature": 0}
    seen = []

    def doc_to_text(doc, round_idx, previous_output, previous_round_info):
        seen.append((round_idx, list(previous_output), previous_round_info))
        done = round_idx == 2
        return [docs[1]["image"]], docs[1]["question"], done, previous_output, {"round": round_idx}

    arguments = (docs[0]["question"], settings, doc_to_visual, doc_to_text, 0, "toy", "test")
    metadata = {"task": "toy", "doc_id": 0, "repeats": 1}
    multi_round = Instance("generate_until_multi_round", arguments, idx=0, metadata=metadata)
    (outputs,) = lm.generate_until_multi_round([multi_round])

    first = lm.generate_until([request("generate_until", 0, docs[0]["question"], settings)])[0]
    second = lm.generate_until([request("generate_until", 1, docs[1]["question"], settings)])[0]
    assert outputs == [first, second]
    assert seen == [(1, [first], None), (2, [first, second], {"round": 1})]


@pytest.mark.parametrize("kind", KINDS)
def test_offline_tasks_end_to_end(checkpoints, kind):
    """lmms-eval runs the offline tasks on each kind of checkpoint: generation scored by exact match, multiple choice
    by log-likelihood, with lmms-eval's own metrics."""
    tasks = ["vr_hf_red_letter", "vr_hf_red_letter_choice"]
    results = simple_evaluate(
        model="vr_hf",
        model_args=f"pretrained={checkpoints[kind]},batch_size=4",
        tasks=tasks,
        limit=2,
        task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
    )
    assert 0 <= results["results"]["vr_hf_red_letter"]["exact_match,none"] <= 1
    assert results["n-samples"]["vr_hf_red_letter"] == {"original": 200, "effective": 2}
    for sample in results["samples"]["vr_hf_red_letter_choice"]:
        scores = [nll for nll, _ in sample["filtered_resps"]]
        assert len(scores) == len(sample["doc"]["choices"]) == 10
        chosen = sample["doc"]["choices"][int(np.argmin(scores))]
        assert sample["acc"] == float(chosen == sample["target"])


def test_the_lmms_eval_command_runs_the_model(checkpoints, tmp_path):
    """As documented: lmms-eval's own command, the model by its entry point, the offline tasks by --include_path."""
    lmms_eval_command = os.path.join(os.path.dirname(sys.executable), "lmms-eval")  # the script pip installed
    command = [lmms_eval_command, "--model", "vr_hf", "--model_args", f"pretrained={checkpoints['llava_vr']}"]
    command += ["--batch_size", "4", "--tasks", "vr_hf_red_letter_choice", "--limit", "2"]
    command += ["--include_path", TASKS_DIR, "--output_path", str(tmp_path)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (results_file,) = tmp_path.glob("*/*_results.json")
    results = json.loads(results_file.read_text())
    assert results["n-samples"]["vr_hf_red_letter_choice"]["effective"] == 2
    assert "acc,none" in results["results"]["vr_hf_red_letter_choice"]


def test_bad_model_args_fail_before_loading(checkpoints, tmp_path):
    folder = checkpoints["llava_vr"]
    with pytest.raises(ValueError, match=r"Unknown --model_args for vr_hf: \['max_lenght'\]"):
        VisionRememberLMMS(str(tmp_path / "missing"), max_lenght=10)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        VisionRememberLMMS(str(tmp_path / "missing"), dtype="fp8")
    with pytest.raises(ValueError, match="batch_size=0"):
        VisionRememberLMMS(folder, batch_size=0)
    native = tiny_sources(tmp_path)["qwen2_5_vl"]
    with pytest.raises(ValueError, match="is a 'qwen2_5_vl' checkpoint"):
        VisionRememberLMMS(str(native))


def test_videos_are_refused_with_a_clear_error(checkpoints, docs):
    lm = load(checkpoints, "llava_vr", [{"video": "clip.mp4", "question": "What happens?"}])
    video_request = Instance(
        "generate_until",
        ("What happens?", {}, lambda doc: [doc["video"]], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(ValueError, match="Task toy gives a str: vr_hf takes images only"):
        lm.generate_until([video_request])


@pytest.mark.skipif(is_torchvision_available(), reason="with torchvision, the stock video processor is used")
@pytest.mark.parametrize("kind", GRAFTS)
def test_grafted_processors_without_torchvision_refuse_video(checkpoints, docs, kind):
    lm = load(checkpoints, kind, docs)
    with pytest.raises(RuntimeError, match="Video inputs need torchvision"):
        lm.processor(text=["<|video_pad|>"], videos=[np.zeros((2, 28, 28, 3), dtype=np.uint8)])


def test_red_item_tasks_are_the_main_jobs_held_out_questions():
    held_out = [sample for sample in make_split(Settings().test_size, seed=TEST_SEED) if sample.task == "chart"]
    docs = red_item_docs("chart")
    assert len(docs) == len(held_out) == 200
    for doc, sample in zip(docs.select(range(5)), held_out):
        assert np.array_equal(np.asarray(doc["image"]), sample.image)
        assert doc["answer"] == sample.answer and doc["question"] == "Which marker is red?"
        assert doc["answer"] in doc["choices"]


def test_easy_vqa_task_reads_the_package():
    pytest.importorskip("easy_vqa")
    docs = easy_vqa_docs()
    assert len(docs) == 9673
    assert docs[0]["image"].size == (64, 64) and docs[0]["question"] == "what is the red shape?"


def test_paper_benchmarks_resolve_in_lmms_eval():
    """Each of the 11 task names loads its full lmms-eval config (its utils imported), with the metric we read."""
    manager = TaskManager()
    for benchmark in paper.BENCHMARKS:
        config = manager._get_config(benchmark.task)
        metrics = [entry["metric"] for entry in config["metric_list"]]
        assert benchmark.metric in metrics, (benchmark.task, metrics)


def test_paper_suite_needs_the_hub(checkpoints, monkeypatch):
    from vr_hf.evaluation import cli

    monkeypatch.setattr(cli.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit, match="HF_HUB_OFFLINE is set"):
        main(["evaluate", checkpoints["llava_vr"], "--paper"])


def test_evaluate_command_prints_the_table(checkpoints, tmp_path, capsys):
    output = tmp_path / "eval"
    main(
        [
            "evaluate",
            checkpoints["llava_vr"],
            "--tasks",
            "vr_hf_red_marker",
            "--limit",
            "5",
            "--output-dir",
            str(output),
        ]
    )
    printed = capsys.readouterr().out
    header, row = printed.split("score (%)")[0], printed.splitlines()
    line = next(line for line in row if line.startswith("vr_hf_red_marker"))
    assert "answer prior (%)" in printed and "questions" in printed and "task" in header
    name, metric, score, prior, questions = line.split()
    answers = red_item_docs("chart")["answer"][:5]  # one answer comes twice: the prior is 2 of 5
    assert metric == "exact_match" and int(questions) == 5
    assert float(prior) == pytest.approx(100 * max(answers.count(answer) for answer in answers) / 5, abs=0.05) == 40
    assert (output / "results.json").is_file() and line in (output / "table.md").read_text()
    with pytest.raises(SystemExit, match="Unknown lmms-eval tasks"):
        main(["evaluate", checkpoints["llava_vr"], "--tasks", "vr_hf_red_letters"])
