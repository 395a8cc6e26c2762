"""Comparison on the toy task (not collected by pytest): GRPO vs TRACE routes and annotators.

    python tests/compare_trace.py                       # 5 methods x 3 seeds, 60 steps each
    python tests/compare_trace.py --jobs 2              # two runs at a time (set OMP_NUM_THREADS=1)
    python tests/compare_trace.py --methods GRPO fkl_key+oracle --seeds 0
    python tests/compare_trace.py --context_check       # the evidence for the teacher context (below)

Every run is `trace.py` with its defaults plus the method's flags and `--eval_every 10`, under
`--output_dir` (default runs/compare_trace). TRACE runs use `--teacher_context label+solution`: on
the toy the self-teacher was trained only with contexts that start with a reference solution, and
on the step-1 rollouts that context brings the teacher closer to the student on both kinds of span
(`--context_check` below; README, "TRACE"). A run whose metrics already hold its final evaluation
is not run again, so an interrupted comparison continues where it stopped. Prints a table (eval
avg@4 at the start, at step 20 (inside the KL window) and at the end, mean [min, max] over seeds;
the final careful share; the mean KL on routed tokens and the annotation success over the KL
window) and writes one PNG of the eval curves and the careful-strategy share.

`--context_check` runs no training: for the step-1 rollouts of the toy model (32 problems x 8, per
seed) it asks, for each `--teacher_context`, whether the self-teacher is surer than the student of the
*correct* token where the oracle routes: on key spans of correct rollouts (the sampled tokens are
correct) the mean of log pi_T - log pi_S; at the first wrong character of an error span of an
incorrect rollout (a wrong result of a step or a wrong boxed answer) the same for the character that
would have been correct, and the share of those positions where the teacher is surer; and the mean
KL the loss would see there (forward on key spans, reverse on error spans).
"""

import argparse
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import EVAL_KEY, curve, draw, last, run, spread  # noqa: E402

CONTEXT = ["--teacher_context", "label+solution"]
METHODS = {
    "GRPO": ["--lambda_0", "0"],
    "fkl_key+oracle": ["--route", "fkl_key", "--annotator", "oracle", *CONTEXT],
    "rkl_error+oracle": ["--route", "rkl_error", "--annotator", "oracle", *CONTEXT],
    # the toy cannot annotate: without --annotator_patience 0 the run would stop at step 3
    "fkl_key+self": ["--route", "fkl_key", "--annotator", "self", "--annotator_patience", "0",
                     *CONTEXT],
    "fkl_key+random": ["--route", "fkl_key", "--annotator", "random", *CONTEXT],
}


def window_mean(records: list[dict], key: str) -> float:
    """Mean of `key` over the steps that logged a finite value (the KL window)."""
    values = [r[key] for r in records if key in r and isinstance(r[key], float) and math.isfinite(r[key])]
    return sum(values) / len(values) if values else math.nan


def context_check(seeds: list[int]) -> None:
    import random as stdlib_random
    import re

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import common
    import trace as trace_script

    torch.set_grad_enabled(False)
    dist_info = common.init_distributed()
    tokenizer = common.load_tokenizer("toy")
    model = common.load_model("toy", dist_info, trainable=False)
    rows = common.load_problems("toy", "train", tokenizer=tokenizer)
    engine = common.make_engine("hf", model, tokenizer, 256)
    grader = common.Grader(10.0)
    head = common.output_head(model)
    stats = {}
    for seed in seeds:
        stdlib_random.seed(seed)
        torch.manual_seed(seed)
        problems = [rows[i] for i in common.ProblemSampler(len(rows), seed).next(32)]
        prompts = [common.build_prompt(tokenizer, p["problem"]) for p in problems for _ in range(8)]
        responses = engine.generate(prompts, common.SamplingParams(1.0, 1.0, 0, 64))
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, _ = grader.grade(texts, [p["answer"] for p in problems for _ in range(8)])
        for i, response in enumerate(responses):
            problem, correct = problems[i // 8], rewards[i] > 0
            text, spans = trace_script.response_text(tokenizer, response)
            request = trace_script.Request(problem["problem"], text, trace_script.split_segments(text), correct)
            chosen, label = trace_script.oracle_annotation(request)
            mask = trace_script.capped_mask(chosen, trace_script.segment_tokens(spans, request.segments),
                                            len(response), 0.25)
            if not mask.any():
                continue
            probe = None  # (position, correct token) at the first wrong character of an error line
            if not correct:
                a, b = request.segments[chosen[0]]
                line, right = text[a:b], None
                step = re.fullmatch(r"(\d+)([+\-*])(\d+)=(-?\d+)", line)
                if re.fullmatch(r"\\boxed\{-?\d+\}", line):
                    right = f"\\boxed{{{problem['answer']}}}"
                elif step and label == "arithmetic":
                    left, op, number = int(step[1]), step[2], int(step[3])
                    result = left + number if op == "+" else left - number if op == "-" else left * number
                    right = f"{left}{op}{number}={result}"
                if right is not None:
                    k = next((k for k, (x, y) in enumerate(zip(line, right)) if x != y), None)
                    start = [t for t, (s, e) in enumerate(spans) if s == a + k] if k is not None else []
                    if start and right[k].isdigit():
                        probe = (start[0], tokenizer.convert_tokens_to_ids(right[k]))
            for context in ("label", "label+solution"):
                teacher_prompt = common.build_prompt(tokenizer, problem["problem"], trace_script.teacher_context(
                    context, label, correct, problem))
                h_s, targets, valid = common.response_hidden(model, [prompts[i]], [response], tokenizer.pad_token_id)
                h_t, _, _ = common.response_hidden(model, [teacher_prompt], [response], tokenizer.pad_token_id)
                span = mask[None, :].to(valid.device) & valid
                kind = "key" if correct else "error"
                kl = common.token_kl(head, h_s, head, h_t, span, "forward" if correct else "reverse")
                entry = stats.setdefault((context, kind), {"kl": [], "gap": [], "probe": []})
                entry["kl"] += kl[span].tolist()
                if correct:
                    lp_s, _ = common.token_logprob_entropy(head, h_s, targets, span)
                    lp_t, _ = common.token_logprob_entropy(head, h_t, targets, span)
                    entry["gap"] += (lp_t - lp_s)[span].tolist()
                elif probe is not None:
                    position, token = probe
                    fixed = response[:position] + [token]
                    scores = []
                    for prompt in (prompts[i], teacher_prompt):
                        h, y, m = common.response_hidden(model, [prompt], [fixed], tokenizer.pad_token_id)
                        scores.append(common.token_logprob_entropy(head, h, y, m)[0][0, position].item())
                    entry["probe"].append(scores[1] - scores[0])
    grader.close()
    print(f"teacher context check on the toy, step-1 rollouts, seeds {seeds} (32 problems x 8 each)")
    for (context, kind), entry in sorted(stats.items()):
        mean = lambda v: sum(v) / len(v) if v else math.nan  # noqa: E731
        if kind == "key":
            print(f"{context:15} key spans:   {len(entry['kl'])} tokens, FKL {mean(entry['kl']):.3f}, "
                  f"log pi_T - log pi_S on the (correct) sampled tokens {mean(entry['gap']):+.3f}, "
                  f"teacher surer on {mean([g > 0 for g in entry['gap']]):.2f} of them")
        else:
            print(f"{context:15} error spans: {len(entry['kl'])} tokens, RKL {mean(entry['kl']):.3f}; at "
                  f"{len(entry['probe'])} first wrong characters, log pi_T - log pi_S of the correct character "
                  f"{mean(entry['probe']):+.3f}, teacher surer on {mean([g > 0 for g in entry['probe']]):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num_steps", type=int, default=60)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--output_dir", default="runs/compare_trace")
    parser.add_argument("--png", default="", help="figure path (default <output_dir>/compare_trace.png)")
    parser.add_argument("--quiet", action="store_true", help="hide the runs' own output")
    parser.add_argument("--context_check", action="store_true", help="only the teacher-context evidence (above)")
    args = parser.parse_args()
    if args.context_check:
        return context_check(args.seeds)
    png = Path(args.png or Path(args.output_dir) / "compare_trace.png")

    jobs = [(method, seed) for method in args.methods for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(lambda job: run("trace.py", job[0], METHODS[job[0]], job[1], args.num_steps,
                                             args.output_dir, args.quiet), jobs))
    results = {}
    for (method, _), records in zip(jobs, done):
        results.setdefault(method, []).append(records)

    print(f"\n{len(args.seeds)} seeds x {args.num_steps} steps; eval avg@4 on the 256 toy test problems "
          f"(T 0.7, top-p 0.95); mean [min, max] over seeds")
    header = (f"{'method':18} {'eval start':22} {'eval step 20':22} {'eval end':22} {'careful share end':22} "
              f"{'KL routed (window)':20} {'annotation ok':14}")
    print(header + "\n" + "-" * len(header))
    for method, runs in results.items():
        starts = [curve(r, EVAL_KEY)[1][0] for r in runs]
        middles = [dict(zip(*curve(r, EVAL_KEY))).get(20, math.nan) for r in runs]
        finals = [curve(r, EVAL_KEY)[1][-1] for r in runs]
        careful = [last(r, "careful_frac") for r in runs]
        kl = sum(window_mean(r, "kl_routed") for r in runs) / len(runs)
        ok = sum(window_mean(r, "annotation_success") for r in runs) / len(runs)
        print(f"{method:18} {spread(starts):22} {spread(middles):22} {spread(finals):22} {spread(careful):22} "
              f"{kl:<20.3f} {ok:<14.3f}")
    print("(careful share: mean of the last 5 steps; KL routed and annotation ok: means over the steps of the "
          "KL window, nan for GRPO)")
    draw(results, png, len(args.seeds))


if __name__ == "__main__":
    main()
