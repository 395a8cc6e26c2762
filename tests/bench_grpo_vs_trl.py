"""Benchmark (not collected by pytest): this project's GRPO step vs TRL's GRPOTrainer, same work.

    pip install trl            # benchmark-only dependency (not in requirements.txt); keep torch as it is
    python tests/bench_grpo_vs_trl.py                          # toy model, 8 timed steps of each
    python tests/bench_grpo_vs_trl.py --model toy-large --steps 12 --max_new_tokens 64

"Ours" is `antisd.py --lambda_max 0` (GRPO: no teacher pass) run by `antisd.main`; "TRL" is
`trl.GRPOTrainer`. Both get the same setting, so that only the implementations differ:
  - the same model directory (`common.resolve_model(--model)`), fp32, no activation checkpointing,
    on the CPU; the same learning rate, AdamW, grad-norm clip 1.0, clip 0.2 / 0.28, no KL (beta 0);
  - the same prompts: the project's chat-template prompts (`common.build_prompt`), given to TRL as
    pre-templated text (checked to tokenize to the same ids), in the same order: step k of both
    samples the same `--num_problems` toy problems (our ProblemSampler's order; TRL unshuffled);
  - the same batch: `--num_problems` x `--num_generations` rollouts per optimizer step, sampled at
    temperature 1.0 with the same `--max_new_tokens`, in micro-batches of `--micro_batch_size`
    (TRL: per-device batch = micro-batch, gradient accumulation = rollouts / micro-batch, so one
    generation and one optimizer step per step);
  - the same reward: both grade with this project's `common.Grader` (math-verify in a worker
    subprocess, answer from the last \\boxed{}), one `grade` call per batch.
Each side runs in its own process; the two alternate step by step (ours, TRL, TRL, ours, ...), so
a change in machine load hits both. A step is timed from the moment it is released until its
optimizer step is done (ours: until its metrics line is logged). The first `--warmup` steps of
each are not counted (grader start-up, allocator warm-up). Generated tokens per step include each
response's stop token. Time per generated token = step seconds / generated tokens of that step;
the printed ratio is ours / TRL of the medians (below 1 = ours is faster).
"""

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def problem_rows(count: int, seed: int) -> list[dict]:
    """The toy problems the first `count / num_problems` steps of `antisd.main` sample, in order."""
    import common

    rows = common.load_problems("toy", "train")
    return [rows[i] for i in common.ProblemSampler(len(rows), seed).next(count)]


def run_ours(conn, args, out_dir: str) -> None:
    """antisd.main with --lambda_max 0; a step starts when the driver says so (at the sampler)."""
    import antisd
    import common

    started = {}

    class SteppedSampler(common.ProblemSampler):
        def next(self, count):
            conn.recv()  # wait for the driver's "go"
            started["t"] = time.perf_counter()
            return super().next(count)

    class ReportingLogger(common.RunLogger):
        def log(self, step, metrics, prefix="step"):
            super().log(step, metrics, prefix)
            if prefix == "step":
                tokens = metrics["response_len"] * args.num_problems * args.num_generations
                conn.send({"seconds": time.perf_counter() - started["t"], "tokens": tokens})

    common.ProblemSampler, common.RunLogger = SteppedSampler, ReportingLogger
    conn.send("ready")
    antisd.main([
        "--model", args.model, "--lambda_max", "0", "--eval_dataset", "", "--seed", str(args.seed),
        "--num_steps", str(args.warmup + args.steps), "--num_problems", str(args.num_problems),
        "--num_generations", str(args.num_generations), "--max_new_tokens", str(args.max_new_tokens),
        "--micro_batch_size", str(args.micro_batch_size), "--lr", str(args.lr),
        "--output_dir", out_dir, "--run_name", "ours"])


def run_trl(conn, args, out_dir: str) -> None:
    """trl.GRPOTrainer configured like antisd.py --lambda_max 0; a step starts at on_step_begin."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import common

    model_dir = common.resolve_model(args.model)
    tokenizer = common.load_tokenizer(args.model)
    rows = problem_rows((args.warmup + args.steps) * args.num_problems, args.seed)
    prompts = [common.build_prompt(tokenizer, row["problem"]) for row in rows]
    texts = [tokenizer.decode(ids) for ids in prompts]  # pre-templated prompt text
    assert all(tokenizer(t).input_ids == ids for t, ids in zip(texts[:8], prompts)), "prompt ids differ"
    dataset = Dataset.from_dict({"prompt": texts, "answer": [row["answer"] for row in rows]})
    grader = common.Grader()
    state = {}

    def reward(completions, answer, completion_ids, **kwargs):
        state["tokens"] = sum(len(ids) for ids in completion_ids)
        return grader.grade(completions, answer)[0]

    class Stepper(TrainerCallback):
        def on_step_begin(self, *unused, **kwargs):
            conn.recv()
            state["t"] = time.perf_counter()

        def on_step_end(self, *unused, **kwargs):
            conn.send({"seconds": time.perf_counter() - state["t"], "tokens": state["tokens"]})

    rollouts = args.num_problems * args.num_generations
    config = GRPOConfig(
        output_dir=os.path.join(out_dir, "trl"), use_cpu=True, bf16=False, fp16=False, seed=args.seed,
        model_init_kwargs={"dtype": torch.float32}, gradient_checkpointing=False,
        per_device_train_batch_size=args.micro_batch_size, gradient_accumulation_steps=rollouts // args.micro_batch_size,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, shuffle_dataset=False,
        max_steps=args.warmup + args.steps, logging_steps=10**6, save_strategy="no", report_to="none",
        disable_tqdm=True, log_completions=False, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stepper()])
    conn.send("ready")
    trainer.train()
    grader.close()


def worker(kind: str, conn, args, out_dir: str) -> None:
    try:
        run = run_ours if kind == "ours" else run_trl
        if args.profile:  # the whole worker, set-up included; read with pstats
            import cProfile

            cProfile.runctx("run(conn, args, out_dir)", globals(), locals(), os.path.join(args.profile, f"{kind}.prof"))
        else:
            run(conn, args, out_dir)
        conn.send("finished")
    except BaseException as error:  # tell the driver instead of leaving it waiting
        conn.send(f"error: {type(error).__name__}: {error}")
        raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps of each")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="default: antisd.py's default")
    parser.add_argument("--num_problems", type=int, default=32)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--micro_batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", default="", help="write cProfile stats of each side to DIR/ours.prof, DIR/trl.prof")
    args = parser.parse_args()
    import antisd
    import torch
    import transformers
    import trl

    args.max_new_tokens = args.max_new_tokens or antisd.Args().max_new_tokens
    if (args.num_problems * args.num_generations) % args.micro_batch_size:
        parser.error("--micro_batch_size must divide num_problems x num_generations")
    import common

    common.build_toy_model(args.model) if args.model in common.TOY_SPECS else None  # build before timing
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"{torch.get_num_threads()} threads, model {args.model}, {args.num_problems} problems x "
          f"{args.num_generations} rollouts, max_new_tokens {args.max_new_tokens}, fp32, CPU", flush=True)
    context = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out_dir:
        sides = {}
        for kind in ("ours", "trl"):
            mine, theirs = context.Pipe()
            process = context.Process(target=worker, args=(kind, theirs, args, out_dir))
            process.start()
            sides[kind] = (process, mine)
        for kind, (_, conn) in sides.items():
            message = conn.recv()
            if message != "ready":
                sys.exit(f"{kind}: {message}")
        results = {"ours": [], "trl": []}
        for step in range(args.warmup + args.steps):
            order = ("ours", "trl") if step % 2 == 0 else ("trl", "ours")
            for kind in order:
                conn = sides[kind][1]
                conn.send("go")
                result = conn.recv()
                if not isinstance(result, dict):
                    sys.exit(f"{kind}: {result}")
                if step >= args.warmup:
                    results[kind].append(result)
                print(f"step {step + 1} {kind:4s} {result['seconds']:.3f} s, {result['tokens']:.0f} tokens"
                      + (" (warm-up)" if step < args.warmup else ""), flush=True)
        for process, conn in sides.values():
            conn.recv()  # "finished"
            process.join()

    summary = {}
    for kind, steps in results.items():
        summary[kind] = {
            "seconds": statistics.median(r["seconds"] for r in steps),
            "tokens": statistics.median(r["tokens"] for r in steps),
            "per_token": statistics.median(r["seconds"] / r["tokens"] for r in steps),
        }
        print(f"{kind:4s}: median {summary[kind]['seconds']:.3f} s/step, {summary[kind]['tokens']:.0f} generated "
              f"tokens/step, {summary[kind]['per_token'] * 1e3:.3f} ms per generated token")
    print(f"ratio ours/TRL: time per step {summary['ours']['seconds'] / summary['trl']['seconds']:.2f}, "
          f"time per generated token {summary['ours']['per_token'] / summary['trl']['per_token']:.2f}")


if __name__ == "__main__":
    main()
