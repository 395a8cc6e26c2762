"""Datasets (toy, local files, DAPO-style rows), the sampler, prompts and the toy step parser."""

import json

import pytest

import common


def test_toy_rows_are_deterministic_and_complete():
    rows = common.make_toy_rows(300, seed=3)
    assert rows == common.make_toy_rows(300, seed=3) and rows != common.make_toy_rows(300, seed=4)
    assert {r["level"] for r in rows} == set(range(1, common.TOY_MAX_OPS + 1))
    for row in rows:
        start, operations = common._parse_toy_problem(row["problem"])
        assert len(operations) == row["level"]
        value, values = start, [start]
        for op, number in operations:  # re-derive the answer independently of the generator
            value = {"+": value + number, "-": value - number, "*": value * number}[op]
            values.append(value)
        assert str(value) == row["answer"] and all(0 <= v <= common.TOY_MAX_VALUE for v in values)
        assert row["solution"].startswith("<think>\n") and row["solution"].endswith(f"</think>\n\\boxed{{{value}}}")
        assert common.extract_boxed_answer(row["solution"]) == row["answer"] and common.writes_work(row["solution"])
        assert all(s["correct"] for s in common.parse_toy_steps(row["problem"], row["solution"]))
    train, test = common.load_problems("toy", "train"), common.load_problems("toy", "test")
    assert (len(train), len(test)) == (common.TOY_SPLITS["train"][0], common.TOY_SPLITS["test"][0])
    assert not {r["problem"] for r in test} <= {r["problem"] for r in train}
    with pytest.raises(ValueError, match="splits"):
        common.load_problems("toy", "validation")


def test_toy_responses_careful_check_fix_and_shortcut():
    ops = [("+", 3), ("*", 2), ("-", 4)]
    text = lambda pieces: "".join(p for p, _ in pieces)
    assert text(common.toy_response(7, ops)) == "<think>\n7+3=10\n10*2=20\n20-4=16\n</think>\n\\boxed{16}"
    assert text(common.toy_response(7, ops, careful=False)) == "<think>\n</think>\n\\boxed{16}"
    assert not common.writes_work(text(common.toy_response(7, ops, careful=False)))
    checked = common.toy_response(7, ops, check_at=1)
    assert "10*2=20\ncheck 20/2=10 ok\n20-4=16" in text(checked)
    fixed = common.toy_response(7, ops, fix_at=1, wrong_by=1)  # a doubling's wrong result stays even
    assert "10*2=22\ncheck 22/2=11 no\n10*2=20\n" in text(fixed)
    assert [trained for piece, trained in fixed if piece.startswith("10*2=")] == [False, True]  # wrong line not trained
    problem = "Start at 7, apply +3 *2 -4."
    assert all(s["correct"] for s in common.parse_toy_steps(problem, text(checked)))
    assert [s["text"] for s in common.parse_toy_steps(problem, text(fixed)) if not s["correct"]] == ["10*2=22"]


def test_parse_toy_steps_finds_the_first_wrong_line():
    problem = "Start at 7, apply +3 *2 -4."
    judged = lambda response: [(s["kind"], s["correct"]) for s in common.parse_toy_steps(problem, response)]
    response = "<think>\n7+3=10\n10*2=21\n21-4=17\n</think>\n\\boxed{17}"
    steps = common.parse_toy_steps(problem, response)
    assert judged(response) == [("tag", True), ("step", True), ("step", False), ("step", True), ("tag", True),
                                ("answer", False)]
    assert response[steps[2]["start"]: steps[2]["end"]] == "10*2=21"
    # lines are judged locally: a miscopied operand, a wrong operation, a skipped step
    assert judged("<think>\n7+3=10\n11*2=22\n</think>")[2] == ("step", False)
    assert judged("<think>\n7+3=10\n10+2=12\n12-4=8\n</think>\n\\boxed{16}")[2:4] == [("step", False), ("step", True)]
    assert judged("<think>\n7+3=10\n10-4=6\n")[2] == ("step", False)
    # check lines: wrong arithmetic, wrong verdict, wrong inverse; a correct "no" lets the step be redone
    assert judged("<think>\n7+3=10\ncheck 10-3=6 ok\n")[2] == ("check", False)
    assert judged("<think>\n7+3=11\ncheck 11-3=8 ok\n")[1:3] == [("step", False), ("check", False)]
    assert judged("<think>\n7+3=10\ncheck 10+3=13 no\n")[2] == ("check", False)
    assert judged("<think>\n7+3=11\ncheck 11-3=8 no\n7+3=10\n10*2=20\n20-4=16\n</think>\n\\boxed{16}") == [
        ("tag", True), ("step", False), ("check", True), ("step", True), ("step", True), ("step", True),
        ("tag", True), ("answer", True)]
    # the shortcut: its answer line is the key (or the wrong) step; junk is never correct
    assert judged("<think>\n</think>\n\\boxed{16}") == [("tag", True), ("tag", True), ("answer", True)]
    assert judged("junk\n\\boxed{15}") == [("other", False), ("answer", False)]


def test_token_roles_and_spans(toy_tokenizer):
    tok = toy_tokenizer
    text = "<think>\n3+1=4\ncheck 4-1=3 ok\n</think>\n\\boxed{4}<|im_end|>"
    ids = tok(text, add_special_tokens=False).input_ids
    decoded, spans = common.response_token_spans(tok, ids)
    assert decoded == text and len(spans) == len(ids)
    pieces = [decoded[a:b] for a, b in spans]
    assert pieces[:3] == ["<think>", "\n", "3"] and pieces[-4:] == ["\\boxed{", "4", "}", "<|im_end|>"]
    roles = common.token_roles(decoded, spans)
    assert [r for p, r in zip(pieces, roles) if r == "answer"] == ["answer"] * 3
    assert [p for p, r in zip(pieces, roles) if r == "work"] == list("3+1=4") + ["check "] + list("4-1=3") + [" ok"]
    assert {p for p, r in zip(pieces, roles) if r == "other"} == {"<think>", "\n", "</think>", "<|im_end|>"}
    # a token sequence the tokenizer would not produce itself: per-token fallback, same pieces
    odd = [tok.convert_tokens_to_ids("\n")] * 2
    assert common.response_token_spans(tok, odd) == ("\n\n", [(0, 1), (1, 2)])
    # no final answer: nothing is an answer token, the text is work
    assert set(common.token_roles("5+5", [(0, 1), (1, 2), (2, 3)])) == {"work"}
    assert common.answer_span("<think>\\boxed{1}</think>so \\boxed{2}") == (27, 36)


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
    shape = ('expected one JSON object per problem, e.g. {"problem": "What is 2+3?", '
             '"answer": "5"} (.jsonl: one object per line; .json: a list of objects).')
    with pytest.raises(common.UserError) as error:
        common.load_problems(str(tmp_path / "garbage.jsonl"))
    assert str(error.value) == (f"Dataset '{tmp_path / 'garbage.jsonl'}' (train): none of its 3 "
                                f"rows is a JSON object (int, invalid JSON, list); {shape}")
    (tmp_path / "list.json").write_text('["1+1", "2+2"]')
    with pytest.raises(common.UserError, match=r"none of its 2 rows is a JSON object \(str\)"):
        common.load_problems(str(tmp_path / "list.json"))
    columns = {"problem": ["1+1", "2+2"], "answer": ["2", "4"]}
    for name, text in [("columns.json", json.dumps(columns, indent=2)),
                       ("columns.jsonl", json.dumps(columns))]:
        (tmp_path / name).write_text(text)
        with pytest.raises(common.UserError) as error:
            common.load_problems(str(tmp_path / name))
        assert str(error.value) == (f"Dataset file '{tmp_path / name}' is column-oriented JSON "
                                    f"(a list per column: ['problem', 'answer']); {shape}")
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
