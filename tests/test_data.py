"""Datasets (toy, local files, DAPO-style rows), the sampler, prompts and the toy step parser."""

import json

import pytest

import common


def test_toy_rows_are_deterministic_and_complete():
    rows = common.make_toy_rows(200, seed=3)
    assert rows == common.make_toy_rows(200, seed=3) and rows != common.make_toy_rows(200, seed=4)
    assert {r["level"] for r in rows} == {1, 2, 3, 4}
    for row in rows:
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        assert common.extract_boxed_answer(row["solution"]) == row["answer"]
        assert all(s["correct"] for s in common.parse_toy_steps(row["problem"], row["solution"]))
    train, test = common.load_problems("toy", "train"), common.load_problems("toy", "test")
    assert len(train) == common.TOY_SPLIT_SIZES["train"] and len(test) == common.TOY_SPLIT_SIZES["test"]
    assert train[0] != test[0]
    with pytest.raises(ValueError, match="splits"):
        common.load_problems("toy", "validation")


def test_parse_toy_steps_finds_the_first_wrong_step():
    problem = "Compute 37+48-12."
    response = "37+48=85\n85-12=72\n\\boxed{72}"
    steps = common.parse_toy_steps(problem, response)
    assert [s["correct"] for s in steps] == [True, False, False]
    assert response[steps[1]["start"]: steps[1]["end"]] == "85-12=72"
    assert steps[-1]["final"]
    # steps are judged locally: a miscopied operand is the first wrong step, later lines may be fine
    steps = common.parse_toy_steps(problem, "36+48=84\n84-12=72\n\\boxed{72}")
    assert [s["correct"] for s in steps] == [False, True, False]
    assert [s["correct"] for s in common.parse_toy_steps(problem, "37+47=84\n84-12=72\n\\boxed{72}")] == [
        False, True, False]  # wrong right operand
    assert [s["correct"] for s in common.parse_toy_steps(problem, "37+48=85\n85+12=97\n\\boxed{73}")] == [
        True, False, True]  # wrong operation; the boxed answer is still the true one
    assert [s["correct"] for s in common.parse_toy_steps("Compute 3+4.", "junk\n3+4=7\n\\boxed{7}")] == [False, True, True]


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_local_jsonl_with_malformed_rows_and_missing_answers(tmp_path, capsys):
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, [
        {"problem": "1+1?", "answer": "2", "solution": "1+1=2"},
        {"problem": "2+2?", "answer": ""},          # no answer: skipped, counted
        {"problem": "3+3?"},                        # no answer: skipped, counted
        "{not json",                                # malformed: skipped, counted
        {"problem": 5, "answer": "5"},              # malformed problem
        {"problem": "4+4?", "answer": 8},
    ])
    rows = common.load_problems(str(path))
    assert rows == [{"problem": "1+1?", "answer": "2", "solution": "1+1=2"},
                    {"problem": "4+4?", "answer": "8", "solution": ""}]
    out = capsys.readouterr().out
    assert "skipped 2 rows without an answer and 2 malformed rows" in out


def test_custom_keys_json_and_parquet(tmp_path):
    data = [{"question": "q1", "meta": {"gold": "1"}, "worked": "w1"}, {"question": "q2", "meta": {"gold": "2"}}]
    (tmp_path / "d.json").write_text(json.dumps(data))
    rows = common.load_problems(str(tmp_path / "d.json"), problem_key="question", answer_key="meta.gold",
                                solution_key="worked")
    assert rows == [{"problem": "q1", "answer": "1", "solution": "w1"}, {"problem": "q2", "answer": "2", "solution": ""}]
    import pandas as pd

    pd.DataFrame([{"problem": "p", "answer": "a", "solution": "s"}] * 3).to_parquet(tmp_path / "d.parquet")
    assert len(common.load_problems(str(tmp_path / "d.parquet"), limit=2)) == 2


def test_dapo_style_parquet_is_adapted(tmp_path):
    import pandas as pd

    content = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\nWhat is $2+3$?\n\n"
               "Remember to put your answer on its own line after \"Answer:\".")
    frame = pd.DataFrame([{"data_source": "math_dapo", "prompt": [{"content": content, "role": "user"}],
                           "ability": "MATH", "reward_model": {"ground_truth": "5", "style": "rule-lighteval/MATH_v2"},
                           "extra_info": {"index": "0"}}])
    frame.to_parquet(tmp_path / "dapo-math-17k.parquet")
    rows = common.load_problems(str(tmp_path / "dapo-math-17k.parquet"))
    assert rows == [{"problem": "What is $2+3$?", "answer": "5", "solution": ""}]


def test_clear_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"question": "x", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no column 'problem' \(set --problem_key\).*question"):
        common.load_problems(str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(common.UserError, match=r"^Dataset '.*empty.jsonl' \(train\) is empty\.$"):
        common.load_problems(str(tmp_path / "empty.jsonl"))
    write_jsonl(tmp_path / "garbage.jsonl", ["{not json", "[1, 2]", "7"])
    with pytest.raises(common.UserError, match=r"all 3 rows are malformed \(not JSON objects\)"):
        common.load_problems(str(tmp_path / "garbage.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(common.UserError, match="is a directory"):
        common.load_problems(str(tmp_path / "dir.jsonl"))
    write_jsonl(tmp_path / "noanswers.jsonl", [{"problem": "x", "answer": ""}])
    with pytest.raises(ValueError, match="no usable rows"):
        common.load_problems(str(tmp_path / "noanswers.jsonl"))
    with pytest.raises(ValueError, match="does not exist"):
        common.load_problems(str(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="Cannot read dataset"):
        common.load_problems(str(tmp_path / "bad.parquet"))
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported extension"):
        common.load_problems(str(tmp_path / "d.csv"))


def test_model_names_resolve_or_fail_clearly(tmp_path):
    assert common.resolve_model("Qwen3-8B") == "Qwen/Qwen3-8B"
    assert common.resolve_model("Qwen3-4B-Instruct-2507") == "Qwen/Qwen3-4B-Instruct-2507"
    assert common.resolve_model("Qwen/Qwen3-1.7B") == "Qwen/Qwen3-1.7B"
    with pytest.raises(ValueError, match="Unknown --model 'qwen-8b'"):
        common.resolve_model("qwen-8b")
    with pytest.raises(ValueError, match="without config.json"):
        common.resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="Unknown --model"):
        common.resolve_model("./no/such/dir")


def test_sampler_resumes_exactly():
    sampler = common.ProblemSampler(5, seed=7)
    first = [sampler.next(3) for _ in range(2)]
    state = sampler.state_dict()
    rest = [sampler.next(3) for _ in range(4)]
    other = common.ProblemSampler(5, seed=7)
    other.load_state_dict(state)
    assert [other.next(3) for _ in range(4)] == rest
    flat = sum(first, []) + sum(rest, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))  # each epoch a permutation


def test_prompt_differs_only_in_context_and_uses_chat_template(toy_tokenizer):
    student = common.build_prompt(toy_tokenizer, "Compute 1+2.")
    teacher = common.build_prompt(toy_tokenizer, "Compute 1+2.", context="Reference solution:\n1+2=3\n\\boxed{3}")
    text = toy_tokenizer.decode(student)
    assert text.startswith("<|im_start|>user\nCompute 1+2.") and text.endswith("<|im_start|>assistant\n")
    assert common.BOXED_INSTRUCTION in text
    assert len(teacher) > len(student) and teacher[-3:] == student[-3:]


def test_prompts_longer_than_the_limit_are_skipped_and_counted(tmp_path, capsys, toy_tokenizer):
    limit = common.max_prompt_length("toy", max_new_tokens=24)
    assert limit == 1024 - 24  # the toy's context minus the response budget
    assert common.max_prompt_length("toy", 24, max_prompt_tokens=100) == 100
    overhead = len(common.build_prompt(toy_tokenizer, ""))
    fits = "x" * (100 - overhead)  # the toy tokenizer is character-level: exactly 100 prompt tokens
    assert len(common.build_prompt(toy_tokenizer, fits)) == 100
    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"problem": fits, "answer": "1"}, {"problem": fits + "x", "answer": "2"},
                       {"problem": "y" * 1_000_000, "answer": "3"}, {"problem": "ok", "answer": ""}])
    rows = common.load_problems(str(path), tokenizer=toy_tokenizer, max_prompt_tokens=100)
    assert [r["answer"] for r in rows] == ["1"]
    assert "skipped 1 rows without an answer, 0 malformed rows and 2 prompts longer than 100 tokens" in \
        capsys.readouterr().out
    with pytest.raises(common.UserError, match=r"no usable rows: 4 read, 1 rows without an answer, 0 malformed "
                                               r"rows and 3 prompts longer than 10 tokens"):
        common.load_problems(str(path), tokenizer=toy_tokenizer, max_prompt_tokens=10)
