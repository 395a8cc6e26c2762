"""Measure the toy testbed (not collected by pytest): build time and every built-in premise.

    python tests/bench_toy.py                       # uses the toy cache (builds what is missing)
    python tests/bench_toy.py --fresh               # builds both toy models from nothing, timed

For `toy` and `toy-large`, over `--seeds` sampling seeds, 4 samples per test problem: eval avg@4 at
the scripts' eval setting (T 0.7, top-p 0.95) and at the rollout setting (T 1.0); the careful-strategy
share and the accuracy of careful and shortcut responses, overall and per level. Then the premises:
on correct `toy` rollouts, the self-teacher signal u = log pi(y|x,c) - log pi(y|x) on work and answer
tokens and at the strategy-deciding token (AntiSD); |log p_toy-large - log p_toy| on the first and
last thirds of `toy` rollouts (IW-OPD). Prints mean [min, max] over seeds.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

NAMES = ["toy", "toy-large"]


def spread(values):
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def sample(model, tokenizer, rows, seed, temperature, k=4, context=None):
    prompts = [common.build_prompt(tokenizer, r["problem"], context(r) if context else None)
               for r in rows for _ in range(k)]
    torch.manual_seed(seed)
    params = common.SamplingParams(temperature, 0.95 if temperature < 1 else 1.0, 0, 64)
    responses = common.HFEngine(model, tokenizer, 256).generate(prompts, params)
    return prompts, responses, tokenizer.batch_decode(responses, skip_special_tokens=True)


def strategy_table(rows, texts, rewards, k=4):
    """{(strategy, level): accuracy} with strategy in careful/shortcut/all and level 0 = all levels."""
    buckets = {}
    for i, (text, reward) in enumerate(zip(texts, rewards)):
        strategy = "careful" if common.writes_work(text) else "shortcut"
        for key in [(strategy, 0), (strategy, rows[i // k]["level"]), ("all", 0), ("all", rows[i // k]["level"])]:
            buckets.setdefault(key, []).append(reward)
    return {key: sum(v) / len(v) for key, v in buckets.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fresh", action="store_true", help="build both toy models in an empty cache, timed")
    args = parser.parse_args()

    if args.fresh:  # each build in its own process, as a first run would do it
        cache = tempfile.mkdtemp(prefix="toy-cache-")
        os.environ["RLVR_TOY_CACHE"] = cache
        for name in NAMES:
            started = time.time()
            subprocess.run([sys.executable, "-c", f"import common; common.build_toy_model({name!r})"],
                           cwd=Path(__file__).resolve().parents[1], check=True, stdout=subprocess.DEVNULL)
            print(f"build {name}: {time.time() - started:.0f} s (fresh cache {cache}, interpreter start included)")

    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    models = {name: common.load_model(name, dist_info, trainable=False) for name in NAMES}
    rows = common.load_problems("toy", "test")
    grader = common.Grader()
    levels = range(1, common.TOY_MAX_OPS + 1)
    for name, model in models.items():
        for temperature in (0.7, 1.0):
            tables, shares = [], []
            for seed in args.seeds:
                _, _, texts = sample(model, tokenizer, rows, seed, temperature)
                rewards, _ = grader.grade(texts, [r["answer"] for r in rows for _ in range(4)])
                tables.append(strategy_table(rows, texts, rewards))
                shares.append(sum(map(common.writes_work, texts)) / len(texts))
            get = lambda key: [t.get(key, float("nan")) for t in tables]
            print(f"\n{name} at T {temperature}: avg@4 {spread(get(('all', 0)))}; careful share {spread(shares)}")
            for strategy in ("careful", "shortcut", "all"):
                per_level = "  ".join(f"L{level} {statistics.mean(get((strategy, level))):.2f}" for level in levels)
                print(f"  {strategy:9} {spread(get((strategy, 0)))}   per level (mean): {per_level}")

    # AntiSD premise: u on correct toy rollouts, teacher = the same model shown the verified answer
    student = models["toy"]
    premise = {"work": [], "answer": [], "decide careful": [], "decide shortcut": []}
    gaps = {"first third": [], "last third": []}
    subset = rows[:128]
    for seed in args.seeds:
        prompts, responses, texts = sample(student, tokenizer, subset, seed, 1.0)
        answers = [subset[i // 4]["answer"] for i in range(len(texts))]
        keep = [i for i, t in enumerate(texts) if common.extract_boxed_answer(t) == answers[i]]
        context = lambda i: f"{common.TOY_CONTEXT_HEADER}\\boxed{{{answers[i]}}}\n\n{common.TOY_FEEDBACK_LINES[0]}"
        teacher_prompts = [common.build_prompt(tokenizer, subset[i // 4]["problem"], context(i)) for i in keep]
        with torch.no_grad():
            plain, _, _ = common.response_logprobs(student, [prompts[i] for i in keep], [responses[i] for i in keep],
                                                   tokenizer.pad_token_id)
            shown, _, _ = common.response_logprobs(student, teacher_prompts, [responses[i] for i in keep],
                                                   tokenizer.pad_token_id)
            strong, _, _ = common.response_logprobs(models["toy-large"], prompts, responses, tokenizer.pad_token_id)
            weak, _, _ = common.response_logprobs(student, prompts, responses, tokenizer.pad_token_id)
        u = shown - plain
        sums = {key: [] for key in premise}
        for row, i in enumerate(keep):
            roles = common.token_roles(*common.response_token_spans(tokenizer, responses[i]))
            for t, role in enumerate(roles):
                if role in sums:
                    sums[role].append(u[row, t].item())
            sums["decide careful" if common.writes_work(texts[i]) else "decide shortcut"].append(u[row, 2].item())
        for key, values in sums.items():
            premise[key].append(statistics.mean(values) if values else float("nan"))
        gap = (strong - weak).abs()
        first, last = [], []
        for row, response in enumerate(responses):
            third = max(1, len(response) // 3)
            first.append(gap[row, :third].mean().item())
            last.append(gap[row, len(response) - third: len(response)].mean().item())
        gaps["first third"].append(statistics.mean(first))
        gaps["last third"].append(statistics.mean(last))
    grader.close()
    print("\nAntiSD premise, mean u on correct toy rollouts (T 1.0, teacher shown the verified answer):")
    for key, values in premise.items():
        print(f"  u on {key:16} {spread(values)}")
    print("IW-OPD premise, mean |log p_toy-large - log p_toy| per token of toy rollouts (T 1.0):")
    for key, values in gaps.items():
        print(f"  {key:12} {spread(values)}")


if __name__ == "__main__":
    main()
