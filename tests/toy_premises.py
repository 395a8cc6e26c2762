"""Measurements of the toy's built-in premises, shared by tests/test_toy.py and tests/bench_toy.py."""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def sample(model, tokenizer, rows, seed, temperature, k=4):
    """k samples per row with the plain prompt: (prompts, responses, texts), k consecutive per row.
    T < 1 uses the scripts' eval nucleus (top-p 0.95); T 1.0 is the rollout setting (plain sampling)."""
    prompts = [common.build_prompt(tokenizer, r["problem"]) for r in rows for _ in range(k)]
    torch.manual_seed(seed)
    params = common.SamplingParams(temperature, 0.95 if temperature < 1 else 1.0, 0, 64)
    responses = common.HFEngine(model, tokenizer, 256).generate(prompts, params)
    return prompts, responses, tokenizer.batch_decode(responses, skip_special_tokens=True)


def strategy_accuracy(rows, texts, rewards, k=4):
    """{(strategy, level): accuracy}, strategy in careful / shortcut / all, level 0 = every level."""
    buckets = {}
    for i, (text, reward) in enumerate(zip(texts, rewards)):
        strategy = "careful" if common.writes_work(text) else "shortcut"
        for key in [(strategy, 0), (strategy, rows[i // k]["level"]), ("all", 0), ("all", rows[i // k]["level"])]:
            buckets.setdefault(key, []).append(reward)
    return {key: sum(v) / len(v) for key, v in buckets.items()}


def self_teacher_u(model, tokenizer, rows, prompts, responses, texts, k=4):
    """AntiSD's premise on the correct rollouts: mean u = log pi(y|x,c) - log pi(y|x) over work and
    answer tokens, and at the strategy-deciding token (index 2, after "<think>" "\\n": a digit for the
    careful strategy, "</think>" for the shortcut). c = the verified answer and the feedback line, the
    form antisd.py builds from another correct rollout of the group."""
    answers = [rows[i // k]["answer"] for i in range(len(texts))]
    keep = [i for i, t in enumerate(texts) if common.extract_boxed_answer(t) == answers[i]]
    contexts = [f"{common.TOY_CONTEXT_HEADER}\\boxed{{{answers[i]}}}\n\n{common.TOY_FEEDBACK_LINES[0]}" for i in keep]
    teacher_prompts = [common.build_prompt(tokenizer, rows[i // k]["problem"], c) for i, c in zip(keep, contexts)]
    with torch.no_grad():
        plain, _, _ = common.response_logprobs(model, [prompts[i] for i in keep], [responses[i] for i in keep],
                                               tokenizer.pad_token_id)
        shown, _, _ = common.response_logprobs(model, teacher_prompts, [responses[i] for i in keep],
                                               tokenizer.pad_token_id)
    u = shown - plain
    values = {"work": [], "answer": [], "decide careful": [], "decide shortcut": []}
    for row, i in enumerate(keep):
        for t, role in enumerate(common.token_roles(*common.response_token_spans(tokenizer, responses[i]))):
            if role in values:
                values[role].append(u[row, t].item())
        values["decide careful" if common.writes_work(texts[i]) else "decide shortcut"].append(u[row, 2].item())
    return {key: (statistics.mean(v) if v else float("nan"), len(v)) for key, v in values.items()}


def teacher_gap_by_third(student, teacher, tokenizer, prompts, responses):
    """IW-OPD's premise: mean |log p_teacher - log p_student| per token over the first and the last
    third of each student rollout (each rollout weighs the same)."""
    with torch.no_grad():
        weak, _, _ = common.response_logprobs(student, prompts, responses, tokenizer.pad_token_id)
        strong, _, _ = common.response_logprobs(teacher, prompts, responses, tokenizer.pad_token_id)
    gap = (strong - weak).abs()
    first, last = [], []
    for row, response in enumerate(responses):
        third = max(1, len(response) // 3)
        first.append(gap[row, :third].mean().item())
        last.append(gap[row, len(response) - third: len(response)].mean().item())
    return statistics.mean(first), statistics.mean(last)
