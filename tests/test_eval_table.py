"""--eval_only on several benchmarks: per-benchmark k, avg@k / pass@k, one table as Markdown and JSON."""

import json

import pytest

import antisd
import common
import iw_opd
import paced
import trace


def test_parse_eval_k():
    names = ["toy", "math500", "aime24=/data/aime.jsonl", "rows.jsonl"]
    assert common.parse_eval_k("", names) == {"toy": 4, "math500": 4, "aime24=/data/aime.jsonl": 32, "rows.jsonl": 4}
    assert common.parse_eval_k("", ["math500", "aime24"], paced.EVAL_PROTOCOL) == {"math500": 8, "aime24": 8}
    assert common.parse_eval_k("", ["hmmt25", "minerva"], antisd.EVAL_PROTOCOL) == {"hmmt25": 32, "minerva": 4}
    assert common.parse_eval_k("2", names) == dict.fromkeys(names, 2)
    for bad in ["0", "x", "aime24=8"]:
        with pytest.raises(common.UserError, match="--eval_k"):
            common.validate_args(antisd.Args(eval_k=bad))


def test_eval_table_markdown():
    results = {"toy": {"problems": 8, "k": 2, "avg@k": 0.5, "pass@k": 0.75, "response_len": 20.4, "no_answer": 1,
                       "grader_timeouts": 0},
               "gpqa=/x.jsonl": {"problems": 4, "k": 4, "avg@k": 0.25, "pass@k": 0.5, "response_len": 9.6,
                                 "no_answer": 0, "grader_timeouts": 0}}
    assert common.eval_table_markdown(results).splitlines() == [
        "| benchmark | problems | k | avg@k (%) | pass@k (%) | mean response tokens | no answer |",
        "|---|---:|---:|---:|---:|---:|---:|",
        "| toy | 8 | 2 | 50.0 | 75.0 | 20 | 1 |",
        "| gpqa | 4 | 4 | 25.0 | 50.0 | 10 | 0 |",
        "| mean | | | 37.5 | 62.5 | | |"]
    flat = common.flat_eval_metrics(results)
    assert flat["eval/toy/avg@2"] == 0.5 and flat["eval/gpqa/pass@4"] == 0.5 and "eval/avg@2" not in flat


def benchmark_file(tmp_path, count=6):
    """An AIME-2024-shaped file (HuggingFaceH4/aime_2024 columns) holding toy problems."""
    rows = common.make_toy_rows(count, seed=7)
    path = tmp_path / "aime_like.jsonl"
    path.write_text("".join(json.dumps({"id": i, "problem": r["problem"], "solution": r["solution"],
                                        "answer": r["answer"], "url": "u", "year": "2024"}) + "\n"
                            for i, r in enumerate(rows)))
    return path


@pytest.mark.parametrize("script", [antisd, iw_opd, paced, trace])
def test_eval_only_writes_one_table(tmp_path, script):
    path = benchmark_file(tmp_path)
    history = script.main(["--eval_only", "--eval_dataset", f"toy,aime24={path}", "--eval_limit", "4",
                           "--eval_k", "3", "--max_new_tokens", "48", "--output_dir", str(tmp_path),
                           "--run_name", "ev"])
    run_dir = tmp_path / "ev"
    table = json.loads((run_dir / "eval_table.json").read_text())
    assert list(table["benchmarks"]) == ["toy", "aime24"]
    assert [(b["problems"], b["k"]) for b in table["benchmarks"].values()] == [(4, 3), (4, 3)]
    markdown = (run_dir / "eval_table.md").read_text().splitlines()
    assert markdown[0] == "## toy (step 0)"
    assert [line.split(" | ")[:3] for line in markdown[4:6]] == [["| toy", "4", "3"], ["| aime24", "4", "3"]]
    assert markdown[6].startswith("| mean | | | ")
    first = history["first"]
    assert first["eval/toy/avg@3"] == table["benchmarks"]["toy"]["avg@k"]
    assert 0 <= first["eval/aime24/avg@3"] <= first["eval/aime24/pass@3"] <= 1
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["eval/aime24/pass@3"] == \
        first["eval/aime24/pass@3"]


def test_training_refuses_a_benchmark_list(tmp_path):
    with pytest.raises(common.UserError, match="comma-separated list of benchmarks is for --eval_only"):
        antisd.main(["--eval_dataset", "toy,math500", "--output_dir", str(tmp_path)])
    with pytest.raises(common.UserError, match="name at least one"):
        antisd.main(["--eval_only", "--eval_dataset", "", "--output_dir", str(tmp_path)])
