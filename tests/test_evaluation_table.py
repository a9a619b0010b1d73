"""The paper's Table 1 from lmms-eval results, and the `vr-hf evaluate` / `vr-hf paper-table` commands' arguments.
None of this needs lmms-eval installed."""

import json
import subprocess
import sys

import pytest

from vr_hf.cli import main
from vr_hf.evaluation import paper


SCORES = {  # lmms-eval's raw values: fractions, and MME's perception score out of 2000
    "gqa": ("exact_match", 0.6),
    "mme": ("mme_perception_score", 1500.0),
    "realworldqa": ("exact_match", 0.55),
    "scienceqa_img": ("exact_match", 0.7),
    "ai2d": ("exact_match", 0.65),
    "mmmu_val": ("mmmu_acc", 0.4),
    "mmstar": ("average", 0.45),
    "chartqa": ("relaxed_overall", 0.6),
    "docvqa_val": ("anls", 0.7),
    "textvqa_val": ("exact_match", 0.65),
    "ocrbench": ("ocrbench_accuracy", 0.5),
}


def lmms_eval_results(scores: dict, pretrained: str = "runs/llava-vr") -> dict:
    """A results file as lmms-eval writes it: `results[task]["<metric>,<filter>"]`, with stderr beside each."""
    results = {
        task: {"alias": task, f"{metric},none": value, f"{metric}_stderr,none": 0.01}
        for task, (metric, value) in scores.items()
    }
    return {"results": results, "config": {"model": "vr_hf", "model_args": f"pretrained={pretrained},batch_size=8"}}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_table_has_the_papers_layout():
    lines = paper.table({"LLaVA-VR": lmms_eval_results(SCORES)}).splitlines()
    groups, rule, columns, row = (cells(line) for line in lines)
    assert columns == ["Model", "GQA", "MME-P", "RealWorldQA", "SQA-IMG", "AI2D", "MMMU", "MMStar", "ChartQA"] + [
        "DocVQA",
        "TextVQA",
        "OCRBench",
        "Avg",
    ]
    assert set(rule) == {"---"} and len(rule) == len(columns) == len(groups)
    assert [(index, name) for index, name in enumerate(groups) if name] == [
        (1, "General"),
        (4, "Knowledge"),
        (8, "OCR&Chart"),
        (12, "Average"),
    ]
    assert row[:4] == ["LLaVA-VR", "60.0", "1500.0", "55.0"] and row[11] == "50.0"
    percents = [60, 1500 / 20, 55, 70, 65, 40, 45, 60, 70, 65, 50]
    assert float(row[-1]) == pytest.approx(sum(percents) / 11, abs=0.05)


def test_missing_benchmarks_show_as_dashes_and_leave_no_average():
    partial = {task: value for task, value in SCORES.items() if task != "mme"}
    row = cells(paper.table({"partial": lmms_eval_results(partial)}).splitlines()[-1])
    assert row[2] == "–" and row[-1] == "–" and row[1] == "60.0"


def test_paper_table_command_reads_lmms_eval_results_files(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(lmms_eval_results(SCORES, pretrained="runs/baseline")))
    second.write_text(json.dumps(lmms_eval_results(SCORES)))
    main(["paper-table", str(first), str(second)])
    rows = capsys.readouterr().out.strip().splitlines()[3:]
    assert [cells(row)[0] for row in rows] == ["runs/baseline", "runs/llava-vr"]
    main(["paper-table", str(first), "--names", "pooling"])
    assert cells(capsys.readouterr().out.strip().splitlines()[-1])[0] == "pooling"
    with pytest.raises(SystemExit):
        main(["paper-table", str(first), str(second), "--names", "one"])
    assert "2 results files but 1 --names" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["paper-table", str(tmp_path / "missing.json")])
    assert "no such results file" in capsys.readouterr().err


def test_evaluate_arguments_are_checked_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0 and "--paper" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["evaluate", "checkpoint", "--limit", "0"])
    assert "--limit must be 1 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "checkpoint", "--paper", "--tasks", "gqa"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "outputs/vr-hf/chekpoint"])
    assert "the checkpoint 'outputs/vr-hf/chekpoint': no such folder" in capsys.readouterr().err


def test_commands_start_without_loading_any_model_library():
    """`vr-hf --help` and `vr-hf serve --help` name their options without importing torch or peft."""
    probe = "import sys, vr_hf.cli; print(sorted({'torch', 'peft', 'transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
    usage = subprocess.run([sys.executable, "-m", "vr_hf.cli", "--help"], capture_output=True, text=True, check=True)
    assert usage.stdout.startswith("usage: vr-hf") and not usage.stderr


def test_importing_vr_hf_silences_bitsandbytes_cpu_kernel_notice():
    pytest.importorskip("bitsandbytes")
    probe = "import vr_hf, bitsandbytes, peft"
    assert "gemm_4bit" not in subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stderr
