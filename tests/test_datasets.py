"""Named datasets: each adapter on a local file of the published schema, the short-name table, GPQA's
shuffled options and letter grading."""

import json

import pytest

import common


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_table_maps_short_names_and_hub_ids():
    assert common.dataset_spec("math500")[0]["hub"] == "HuggingFaceH4/MATH-500"
    assert common.dataset_spec("Idavidrein/gpqa")[0]["config"] == "gpqa_diamond"
    assert common.dataset_spec("aime24=/data/a.parquet")[1] == "/data/a.parquet"
    assert common.dataset_spec("some/other") is None and common.dataset_spec("rows.jsonl") is None
    assert [common.dataset_short_name(n) for n in ["HuggingFaceH4/aime_2024", "hmmt25=/x.jsonl", "toy", "a.jsonl"]] \
        == ["aime24", "hmmt25", "toy", "a.jsonl"]
    with pytest.raises(common.UserError, match="not a named dataset"):
        common.dataset_spec("nope=/x.jsonl")


@pytest.mark.parametrize("short, row, expected", [
    # MATH-500: problem, solution, answer, subject, level, unique_id
    ("math500", {"problem": "1+1?", "solution": "It is \\boxed{2}.", "answer": "2", "subject": "Algebra", "level": 1,
                 "unique_id": "test/algebra/1.json"}, {"problem": "1+1?", "answer": "2", "solution": "It is \\boxed{2}."}),
    # AIME 2024 (HuggingFaceH4): id, problem, solution, answer, url, year
    ("aime24", {"id": 60, "problem": "Find N.", "solution": "... 204", "answer": "204", "url": "u", "year": "2024"},
     {"problem": "Find N.", "answer": "204", "solution": "... 204"}),
    # MathArena AIME 2025 / HMMT Feb 2025: problem_idx, problem, answer (int in some MathArena sets)
    ("aime25", {"problem_idx": 1, "problem": "Find b.", "answer": 70}, {"problem": "Find b.", "answer": "70", "solution": ""}),
    # MathArena AIME 2026 (its card): problem_idx int64, answer int64, problem string
    ("aime26", {"problem_idx": 15, "answer": 277, "problem": "Find m+n."},
     {"problem": "Find m+n.", "answer": "277", "solution": ""}),
    ("hmmt25", {"problem_idx": 3, "problem": "Compute x.", "answer": "\\frac{1}{2}", "problem_type": ["Algebra"]},
     {"problem": "Compute x.", "answer": "\\frac{1}{2}", "solution": ""}),
    # AMC 2023 / Minerva (math-ai): question, answer (a float for AMC in some mirrors)
    ("amc23", {"id": 0, "question": "How many?", "answer": 12.0}, {"problem": "How many?", "answer": "12", "solution": ""}),
    ("minerva", {"question": "Compute v.", "answer": "3.5"}, {"problem": "Compute v.", "answer": "3.5", "solution": ""}),
])
def test_math_benchmark_adapters(tmp_path, short, row, expected):
    path = write_jsonl(tmp_path / f"{short}.jsonl", [row, {**row, "answer": None}])
    rows = common.load_problems(f"{short}={path}", "test")
    assert rows == [expected]  # the row without an answer is skipped


def test_openthoughts_math_part(tmp_path):
    def row(domain, problem, solution):  # the `metadata` config's columns
        return {"problem": problem, "deepseek_reasoning": "...", "deepseek_solution": "...",
                "ground_truth_solution": solution, "domain": domain, "source": "numina_math",
                "test_cases": None, "starter_code": None}
    path = write_jsonl(tmp_path / "ot.jsonl", [
        row("math", "Sum 2 and 3.", "We add: $2+3=\\boxed{5}$."),
        row("code", "Write f.", "def f(): pass"),
        row("math", "No box here.", "The answer is five."),  # no boxed answer: skipped
        row("biology", "Cells?", "\\boxed{7}"),
        row("math", "Nested.", "so \\boxed{\\frac{1}{2}}"),
    ])
    rows = common.load_problems(f"openthoughts-math={path}")
    assert rows == [{"problem": "Sum 2 and 3.", "answer": "5", "solution": "We add: $2+3=\\boxed{5}$."},
                    {"problem": "Nested.", "answer": "\\frac{1}{2}", "solution": "so \\boxed{\\frac{1}{2}}"}]


def test_dapo_short_name_composes_with_load_problems(tmp_path):
    instruction = common.DAPO_PREFIX + " The last line of your response should be of the form Answer: $Answer"
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content":
             f"{instruction}\n\nWhat is 6*7?\n\n{common.DAPO_SUFFIX} \"Answer:\"."}], "ability": "MATH",
             "reward_model": {"ground_truth": "42", "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": "a"}}] * 3
    path = write_jsonl(tmp_path / "dapo.jsonl", rows)
    loaded = common.load_problems(f"dapo={path}")
    assert loaded[0] == {"problem": "What is 6*7?", "answer": "42", "solution": ""}
    assert len(loaded) in (1, 3)  # 1 once DAPO rows are deduplicated (the CUDA-path issue), 3 before


def gpqa_row(question, correct, wrong):
    return {"Pre-Revision Question": "old", "Question": question, "Correct Answer": correct,
            "Incorrect Answer 1": wrong[0], "Incorrect Answer 2": wrong[1], "Incorrect Answer 3": wrong[2],
            "Explanation": "because", "Subdomain": "Physics"}


def test_gpqa_options_shuffled_with_a_fixed_seed_and_graded_by_letter(tmp_path):
    raw = [gpqa_row(f"Question {i}?", f"right {i}", [f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"]) for i in range(12)]
    path = write_jsonl(tmp_path / "gpqa.jsonl", raw)
    rows = common.load_problems(f"gpqa={path}")
    assert rows == common.load_problems(f"gpqa={path}")  # the same order every run
    assert len({row["answer"] for row in rows}) > 1  # the correct option is not always in one place
    for i, row in enumerate(rows):
        assert row["choice"] and row["answer"] in "ABCD"
        lines = row["problem"].split("\n\n")[1].split("\n")
        assert [line[:3] for line in lines] == ["A) ", "B) ", "C) ", "D) "]
        assert f"{row['answer']}) right {i}" in lines  # the gold letter names the correct answer
        assert sorted(line[3:] for line in lines) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
    # per question, not per position: reversing the file keeps each question's order
    reversed_rows = common.load_problems(f"gpqa={write_jsonl(tmp_path / 'rev.jsonl', raw[::-1])}")
    assert reversed_rows[::-1] == rows
    grader = common.grader_for(rows, common.Grader())
    assert isinstance(grader, common.ChoiceGrader)
    gold = rows[0]["answer"]
    other = next(letter for letter in "ABCD" if letter != gold)
    responses = [f"\\boxed{{{gold}}}", f"so \\boxed{{({gold})}}", f"\\boxed{{\\text{{{gold}}}}}",
                 f"\\boxed{{{gold}) right 0}}", f"\\boxed{{{other}}}", "no box", f"<think>\\boxed{{{other}}}</think>\\boxed{{{gold}}}"]
    rewards, counts = grader.grade(responses, [gold] * len(responses))
    assert rewards == [1, 1, 1, 1, 0, 0, 1] and counts == {"no_answer": 1, "timeout": 0}


def test_named_dataset_errors(tmp_path):
    gpqa = {"Question": "x", "Correct Answer": "1",
            **{f"Incorrect Answer {i}": "2" for i in (1, 2, 3)}}
    path = write_jsonl(tmp_path / "bad.jsonl", [{**gpqa, "Incorrect Answer 1": None, "text": "x"}])
    with pytest.raises(common.UserError, match=r"no column 'Incorrect Answer 1', which Idavidrein"):
        common.load_problems(f"gpqa={path}")
    path = write_jsonl(tmp_path / "empty_answers.jsonl", [{**gpqa, "Correct Answer": None}])
    with pytest.raises(common.UserError, match="no column 'Correct Answer'"):
        common.load_problems(f"gpqa={path}")
    # MATH-500 rows without `answer`: refused, naming the column and the columns the file has
    path = write_jsonl(tmp_path / "noanswer.jsonl", [{"problem": "1+1?", "solution": "\\boxed{2}"},
                                                     {"problem": "3"}])
    with pytest.raises(common.UserError) as error:
        common.load_problems(f"math500={path}")
    assert str(error.value) == (f"Dataset 'math500={path}' has no column 'answer' (or 'Answer'), "
                                "which HuggingFaceH4/MATH-500 rows have; its columns are "
                                "['problem', 'solution']. Give the file that dataset's columns.")
    path = write_jsonl(tmp_path / "strings.jsonl", ["1+1", "2+2"])
    with pytest.raises(common.UserError, match=r"none of its 2 rows is a JSON object \(str\)"):
        common.load_problems(f"math500={path}")
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_problems(f"math500={tmp_path / 'missing.jsonl'}")
