"""IW-OPD: importance-weighted on-policy distillation, with standard OPD (arXiv 2606.22600,
"On the Position Bias of On-Policy Distillation").

Idea. In on-policy distillation (OPD) the student samples a response and a frozen, stronger teacher
scores every sampled token; the student is pushed up where the teacher likes its token more than it
does. The paper finds a position bias: the first tokens of a response decide where it goes (and the
two models disagree most there), yet a token-mean loss gives them no more weight than the last ones.
IW-OPD weights each token by how much of the sequence's total unsigned student-teacher discrepancy
is still ahead of it: the first token gets 1 + gamma, and the weight decays towards 1 as the
discrepancy accumulates.

Equations (paper's symbols; sg = stop-gradient; per sequence, t = 1..T over valid response tokens):
    a_t     = log pi_T(y_t | x, y_<t) - log pi_old(y_t | x, y_<t)        sampled-token advantage
    d_t     = |a_t|                     (--iw signed: d_t = a_t, the unstable variant, paper Fig. 4)
    F_{t-1} = sum_{k<t} d_k / (sum_k d_k + 1e-8)                          share of discrepancy before t
    w_t     = 1 + gamma * clamp(1 - F_{t-1}, 0, 1)                        w_1 = 1 + gamma, no grad
    A_t     = w_t * a_t                                                   (--iw none: w_t = 1, plain OPD)
    L       = sum_t -min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t) / N_tokens,   rho_t = pi_theta / pi_old
With one update per batch (--num_minibatches 1) rho_t = 1 and the gradient is
-sum_t w_t a_t grad log pi_theta(y_t) / N_tokens, the paper's loss; N_tokens is the global count of
valid (and, with --token_slice, selected) response tokens over all ranks.

Where the numbers come from: [paper] the IW-OPD paper; [code] the authors' patched verl (the weight
in `dp_actor.py`, there called g_t with w_max = 1 + gamma = 1.5, d_t from the rollout log-probs, fed
into the standard PPO clipped loss); [ours] our choice where the sources are silent. Paper setting
[paper/code]: one rollout per prompt, AdamW lr 1e-5, temperature 1.0, PPO clip 0.2, token-mean, no KL
or entropy terms, thinking off; students Qwen3-0.6B / Qwen3-4B from teachers Qwen3-4B-Instruct-2507 /
Qwen3-30B-A3B-Instruct-2507. Defaults below suit the toy task (larger lr, short responses) [ours];
the README gives the paper's commands. Temperature: the student's, the behaviour policy's and the
teacher's log-probs are all taken under softmax(logits / --temperature): verl, which the authors
patch, scores the reference (here: teacher) model at the rollout temperature too [code]; at the
paper's T = 1 this is moot. --token_slice (the paper's Figure 1a test) keeps the weights
of the whole response and only restricts which tokens enter the loss [ours].

Run:
    python iw_opd.py                                          # IW-OPD: toy student from toy-large, CPU
    python iw_opd.py --iw none                                # standard OPD
    python iw_opd.py --iw signed                              # signed prefix sum (unstable variant)
    python iw_opd.py --eval_only --model <ckpt> --eval_dataset aime24,aime25   # one benchmark table
    python iw_opd.py --iw none --token_slice first30          # OPD on the first 30% of tokens only
    torchrun --nproc_per_node 2 iw_opd.py --num_steps 3       # two CPU ranks (gloo, FSDP2)
Paper (Qwen3-0.6B from Qwen3-4B-Instruct-2507, one 8-GPU node; one rollout per prompt, lr 1e-5,
T 1.0, clip 0.2, thinking off (the default) [code]; data, steps, batch, lengths [ours]):
    torchrun --nproc_per_node 8 iw_opd.py --model Qwen3-0.6B --teacher_model Qwen3-4B-Instruct-2507 \\
        --dataset dapo --eval_dataset math500 --num_steps 200 --num_problems 256 --num_rollouts 1 \\
        --lr 1e-5 --max_new_tokens 8192 --micro_batch_size 8 --activation_checkpointing \\
        --eval_every 20 --save_every 20
On the toy task (README, "The toy testbed") the premise is built in: `toy-large` prefers the careful
strategy, decided at the third response token, so teacher and student disagree most early on
(logged every step as gap_first_third / gap_last_third).
"""

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common import (GracefulStop, Grader, ProblemSampler, RunLogger, RunOptions, SamplingParams,
                    UserError, all_gather_cat, all_reduce_sum, at_least, build_prompt,
                    check_same_tokenizer, eval_command, eval_dataset_names, eval_only_table,
                    evaluate, grader_for, init_distributed, load_checkpoint, load_eval_benchmarks,
                    load_model, load_run_problems, load_tokenizer, make_engine, micro_batches,
                    off_eval_schedule, option, padded_rows, parse_args, parse_eval_k,
                    prepare_run_dir, print0, resolve_model, response_logprobs, response_token_spans,
                    run_main, save_checkpoint, stop_token_ids, validate_args, vllm_options,
                    write_token_picture, writes_work)

SLICE_SHARE = (3, 10)  # --token_slice first30 / last30 keep ceil(3n/10) of n tokens [paper: 30%]
# tokens.html scales, fixed so pictures of different steps and runs compare [ours]
A_SCALE = (-1.0, 1.0)  # a_t in nats (colour): saturated at an e-fold probability ratio
W_SCALE = (1.0, 2.0)  # w_t (underline): 1 (white; plain OPD) to 2 (black; first token at gamma 1)

# Valid ranges of IW-OPD's own options; the shared options' ranges are common.ARG_RULES.
RULES = {
    "num_rollouts": at_least(1),
    "gamma": at_least(0),
    "picture_rollouts": at_least(0),
}


# Evaluation protocol: the paper does not state its k here [ours: common.DATASETS defaults].
EVAL_PROTOCOL: dict = {}


# The step's stdout line (<= 120 columns): the position weights; all: metrics.jsonl
STEP_LINE = ("reward", "loss", "w_mean", "a_mean", "step_seconds")


@dataclass
class Args(RunOptions):
    # teacher and method
    teacher_model: str = option("toy-large", "frozen teacher, same tokenizer as --model [paper: Qwen3-4B-Instruct-2507 "
                                             "for Qwen3-0.6B]")
    iw: Literal["unsigned", "signed", "none"] = option("unsigned", "token weight: unsigned = IW-OPD [paper], signed = "
                                                                    "signed prefix sum [paper Fig. 4], none = OPD")
    gamma: float = option(0.5, "weight of the first token is 1 + gamma [code: w_max 1.5]")
    token_slice: Literal["all", "first30", "last30"] = option("all", "train on all tokens, or only the first / last "
                                                                     "30 percent of each response [paper Fig. 1a]")
    # shared by every script, with this paper's defaults and sources (the rest: common.RunOptions)
    model: str = option("toy", "student: toy | toy-large | alias (Qwen3-0.6B, ...) | hub id | local dir")
    dataset: str = option("toy", "train problems: toy | DAPO-Math-17k hub id | hub id | .jsonl/.json/.parquet")
    solution_key: str = option("solution", "column with a reference solution (optional; unused by OPD)")
    num_steps: int = option(60, "optimizer steps [ours: 60 on the toy]")
    run_name: str = option("", "run directory under --output_dir; default "
                           "iw_opd_<model>_s<seed>_<start time>")
    # rollouts
    num_problems: int = option(64, "prompts per step, global [ours: 64 on the toy]")
    num_rollouts: int = option(1, "rollouts per prompt [paper: 1]")
    max_new_tokens: int = option(64, "response token limit [ours: 64 on the toy]")
    temperature: float = option(1.0, "rollout sampling temperature [code]")
    top_p: float = option(1.0, "rollout nucleus sampling [code]")
    top_k: int = option(0, "rollout top-k, 0 = off [code]")
    enable_thinking: Optional[bool] = option(False, "Qwen3 chat template thinking switch [code: off]")
    gen_batch_size: int = option(256, "sequences per generation batch of the hf engine [ours]")
    # optimisation
    lr: float = option(1e-4, "AdamW learning rate [code: 1e-5; ours: 1e-4 for the tiny toy model]")
    max_grad_norm: float = option(1.0, "gradient-norm clip [code: verl default]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low [code]")
    clip_high: float = option(0.2, "PPO ratio clip eps_high [code]")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")
    logprob_chunk_size: int = option(512, "positions per chunk of the full-vocabulary log-prob/entropy")
    # evaluation, checkpoints
    eval_k: str = option("", "samples per eval problem (avg@k, pass@k): empty = each benchmark's default "
                         "(EVAL_PROTOCOL, toy 4) | one int | name=k pairs, e.g. aime24=32,math500=4")
    eval_temperature: float = option(0.7, "eval sampling temperature [ours]")
    eval_top_p: float = option(0.95, "eval nucleus sampling [ours]")
    eval_top_k: int = option(0, "eval top-k, 0 = off")
    picture_rollouts: int = option(16, "rollouts of the latest step drawn in tokens.html (at each eval and the end)")


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions on [B, T] tensors with a boolean mask of valid tokens
# ---------------------------------------------------------------------------------------------


def sampled_token_advantage(teacher_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a_t = log pi_T(y_t) - log pi_old(y_t) on the sampled token [code]; 0 on padding."""
    return torch.where(mask, teacher_logp - old_logp, 0.0).detach()


@torch.no_grad()
def importance_weights(a: torch.Tensor, mask: torch.Tensor, gamma: float = 0.5, mode: str = "unsigned") -> torch.Tensor:
    """w_t = 1 + gamma * clamp(1 - F_{t-1}, 0, 1), F_{t-1} = sum_{k<t} d_k / (sum_k d_k + 1e-8) per
    sequence (row), d_t = |a_t| (`unsigned`) or a_t (`signed`); `none` gives w_t = 1 (plain OPD).
    Padding has d = 0 and w = 0. No gradient and no normalisation over the batch [code]."""
    if mode == "none":
        return mask.to(a.dtype)
    d = torch.where(mask, a.abs() if mode == "unsigned" else a, 0.0)
    before = d.cumsum(dim=1) - d  # sum_{k<t} d_k: the prefix sum excluding t
    share = before / (d.sum(dim=1, keepdim=True) + 1e-8)
    return torch.where(mask, 1 + gamma * (1 - share).clamp(0, 1), 0.0)


def slice_mask(mask: torch.Tensor, which: str = "all",
               share: tuple[int, int] = SLICE_SHARE) -> torch.Tensor:
    """The tokens that enter the loss: all valid ones, or the first / last `share` = (num, den) of each
    response's valid tokens. A response of n tokens keeps k = ceil(num * n / den) of them, in integer
    arithmetic (a float 0.3 * 50 rounds up to 16; at least one token of any non-empty response; 30%
    of 10 tokens is 3, of 11 tokens 4)."""
    if which == "all":
        return mask
    num, den = share
    lengths = mask.sum(dim=1, keepdim=True)  # int64
    keep = (num * lengths + den - 1) // den
    position = torch.arange(mask.shape[1], device=mask.device)[None, :]
    selected = position < keep if which == "first30" else position >= lengths - keep
    return mask & selected


def opd_loss(logp, old_logp, w, a, mask, num_tokens, clip_low=0.2, clip_high=0.2, tis=None):
    """PPO clipped surrogate with A_t = w_t * a_t, summed over the `mask`ed tokens and divided by the
    global token count `num_tokens` (summed over micro-batches and ranks: the global token-mean).
    With old_logp = sg[logp] (one update per batch) rho = 1 and grad = -sum w_t a_t grad logp / N.
    `tis`: per-token truncated importance weights (`tis_weights`) multiplying each token's term."""
    advantages = (w * a).detach()
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if tis is not None:
        surrogate = surrogate * tis
    return -torch.where(mask, surrogate, torch.zeros_like(surrogate)).sum() / num_tokens


def tis_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling between the sampler (vLLM: another kernel, bf16) and the trainer
    [TRL `vllm_importance_sampling_correction`, mode token_truncate; verl rollout correction]:
    w_t = min(exp(log pi_train(y_t) - log pi_sampler(y_t)), cap), no gradient; 1 where masked.
    log pi_train is the behaviour policy as the trainer computes it (the ratio's denominator)."""
    w = torch.exp(train_logprobs.detach() - sampler_logprobs).clamp(max=cap)
    return torch.where(mask, w, torch.ones_like(w))


def picture_row(tokenizer, problem: dict, response: list[int], reward: float, a: torch.Tensor, w: torch.Tensor,
                step: int) -> dict:
    """One row of tokens.html: the response's tokens coloured by a_t and underlined by w_t."""
    text, spans = response_token_spans(tokenizer, response)
    return {"tokens": [text[s:e] for s, e in spans], "values": a.tolist(), "underline": w.tolist(),
            "hover": [f"A_t=w_t*a_t={u * v:+.3f}" for u, v in zip(w.tolist(), a.tolist())],
            "label": f"step {step} | reward {reward:g}\n{problem['problem']}"}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(Args, argv)
    validate_args(args, RULES)  # every option's range, before anything loads: one-line errors
    eval_ks = parse_eval_k(args.eval_k, eval_dataset_names(args), EVAL_PROTOCOL)  # benchmark -> k
    eval_k = next(iter(eval_ks.values()), 4)  # a training run evaluates on one dataset
    dist_info = init_distributed(args.dist_timeout)
    world, rank = dist_info.world_size, dist_info.rank
    if args.num_problems % world:
        raise UserError(f"--num_problems {args.num_problems} does not divide over {world} ranks: use a multiple "
                        f"of the world size (e.g. {world * max(1, args.num_problems // world)}).")
    sequences = args.num_problems // world * args.num_rollouts
    if sequences % args.num_minibatches:
        raise UserError(f"--num_minibatches {args.num_minibatches} must divide the {sequences} rollouts per rank.")
    # refuses to reuse a run directory; picks the newest valid checkpoint for --resume
    run = prepare_run_dir(args, f"iw_opd_{Path(args.model).name}_s{args.seed}", dist_info)
    run_dir, run_name = run.path, run.path.name
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # ---- data, tokenizers (the teacher's must be the student's: checked before any weights load) ----
    tokenizer = load_tokenizer(args.model)
    if not args.eval_only:
        check_same_tokenizer(tokenizer, load_tokenizer(args.teacher_model, "--teacher_model"), args.model,
                             args.teacher_model)
    train_rows, eval_rows = load_run_problems(args, tokenizer) if not args.eval_only else ([], [])
    benchmarks = load_eval_benchmarks(args, tokenizer) if args.eval_only else []  # (name, rows) each

    # ---- student (trainable), frozen teacher (sharded like the student), optimizer, engine ----
    model = load_model(str(run.checkpoint or args.model), dist_info,
                       activation_checkpointing=args.activation_checkpointing)
    teacher = None if args.eval_only else load_model(args.teacher_model, dist_info, trainable=False,
                                                      flag="--teacher_model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    engine = make_engine(args.rollout, model, tokenizer, args.gen_batch_size, args.gen_batch_tokens,
                         dist_info=dist_info, model_path=str(run.checkpoint or resolve_model(args.model)),
                         vllm_options=vllm_options(args))
    grader = Grader(args.grader_timeout)
    sampler = ProblemSampler(len(train_rows), args.seed)
    start_step = 0
    if run.checkpoint is not None:
        restored = load_checkpoint(run.checkpoint, model, optimizer, dist_info)
        start_step = restored["step"]
        sampler.load_state_dict(restored["state"]["sampler"])
        print0(f"[resume] continuing {run_dir} from step {start_step}")
    logger = RunLogger(run_dir, args, dist_info, args.track, resume_step=run.resume_step,
                       step_line=STEP_LINE)
    rollout_params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    eval_params = SamplingParams(args.eval_temperature, args.eval_top_p, args.eval_top_k, args.max_new_tokens)
    pad_id, stop_ids = tokenizer.pad_token_id, stop_token_ids(tokenizer, model)

    picture = []  # rows of tokens.html from the latest step (rank 0)

    def run_eval(step: int) -> dict:
        metrics = evaluate(engine, tokenizer, eval_rows, grader_for(eval_rows, grader), eval_params, eval_k, dist_info,
                           args.enable_thinking,
                           own_rng=off_eval_schedule(step, args.eval_every))
        logger.log(step, metrics, prefix="eval")
        draw_picture()
        return metrics

    def draw_picture():
        if picture and dist_info.is_main:
            note = ("colour: a_t = log pi_T(y_t) - log pi_old(y_t) in nats, red = the teacher "
                    "likes the sampled token more than the student (pushed up), blue = less "
                    "(pushed down); "
                    f"underline: the weight w_t (--iw {args.iw}, gamma {args.gamma}; white = 1); "
                    "hover: A_t = w_t a_t.")
            write_token_picture(run_dir / "tokens.html", picture, "a_t", A_SCALE, note=note,
                                title=f"{run_name}: a_t and w_t per token",
                                underline=("w_t", *W_SCALE))

    history = {}
    if args.eval_only:  # every --eval_dataset benchmark with its k: one table (eval_table.md/.json)
        history["first"] = eval_only_table(engine, tokenizer, benchmarks, grader, eval_params, eval_ks, dist_info,
                                           logger, run_dir, start_step, str(run.checkpoint or args.model),
                                           args.enable_thinking)
        logger.close()
        grader.close()
        return history
    if eval_rows and start_step == 0:
        history["first"] = run_eval(start_step)

    problems_per_rank = args.num_problems // world
    group = args.num_rollouts
    budget = (args.micro_batch_size, args.micro_batch_tokens)  # sequences and padded tokens per forward
    print0(f"[iw_opd] {run_name}: {args.num_steps} steps x {args.num_problems} prompts x {group} rollout(s) on "
           f"{world} rank(s), --iw {args.iw}, --token_slice {args.token_slice}, teacher {args.teacher_model}, "
           f"device {dist_info.device}")
    train_started = time.time()
    stop = GracefulStop()  # SIGINT/SIGTERM from here: end after the current step, checkpointed
    end_step = args.num_steps  # the step reached: earlier after a SIGINT/SIGTERM stop
    for step in range(start_step, args.num_steps):
        step_started = time.time()

        # ---- 1. rollouts: num_rollouts samples per prompt; this rank takes its slice of the global batch
        indices = sampler.next(args.num_problems)[rank * problems_per_rank:(rank + 1) * problems_per_rank]
        problems = [train_rows[i] for i in indices]
        prompts = [build_prompt(tokenizer, p["problem"], enable_thinking=args.enable_thinking) for p in problems]
        prompts = [prompt for prompt in prompts for _ in range(group)]  # rollout i: problem i // group
        if args.tis_cap > 0:  # the sampler's own log-probs, for the sampler/trainer correction
            responses, sampler_logprobs = engine.generate(prompts, rollout_params, desc="rollout", logprobs=True)
        else:
            responses = engine.generate(prompts, rollout_params, desc="rollout")
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)

        # ---- 2. verifier rewards: logged only, OPD's signal is the teacher
        rewards, grade_counts = grader.grade(texts, [p["answer"] for p in problems for _ in range(group)])
        shown_rows = dict.fromkeys(range(min(args.picture_rollouts, len(responses)) if rank == 0 else 0))

        # ---- 3. no-grad pass: teacher log-probs on the student's tokens (same prompt); the behaviour
        # policy's log-probs are needed separately only when a batch gets several updates
        rollouts = range(len(responses))
        lengths = [len(prompts[i]) + len(responses[i]) for i in rollouts]
        teacher_logprobs, behaviour_logprobs = [None] * len(rollouts), [None] * len(rollouts)
        with torch.no_grad():
            for batch in micro_batches(rollouts, lengths, *budget, same_count=True):
                logprobs, _, mask = response_logprobs(teacher, [prompts[i] for i in batch],
                                                      [responses[i] for i in batch], pad_id, args.logprob_chunk_size,
                                                      temperature=args.temperature)
                for i, row, row_mask in zip(batch, logprobs, mask):
                    teacher_logprobs[i] = row[row_mask].float()
            if args.num_minibatches > 1:
                for batch in micro_batches(rollouts, lengths, *budget, same_count=True):
                    logprobs, _, mask = response_logprobs(model, [prompts[i] for i in batch],
                                                          [responses[i] for i in batch], pad_id,
                                                          args.logprob_chunk_size, temperature=args.temperature)
                    for i, row, row_mask in zip(batch, logprobs, mask):
                        behaviour_logprobs[i] = row[row_mask]

        # ---- 4. policy gradient on A_t = w_t * a_t (PPO clip), global token-mean over the loss tokens
        model.train()
        sums = dict.fromkeys(["loss", "loss_tokens", "entropy", "clipped", "w", "a", "abs_a", "gap_first",
                              "gap_last", "tis"], 0.0)
        w_min, w_max = math.inf, -math.inf
        per_minibatch = len(responses) // args.num_minibatches
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            loss_tokens = all_reduce_sum(sum(int(slice_mask(torch.ones(1, len(responses[i]), dtype=torch.bool),
                                                            args.token_slice).sum()) for i in owned)).item()
            for batch in micro_batches(owned, lengths, *budget, same_count=True):
                logprobs, entropy, mask = response_logprobs(model, [prompts[i] for i in batch],
                                                            [responses[i] for i in batch], pad_id,
                                                            args.logprob_chunk_size, temperature=args.temperature)
                # the behaviour policy (the weights that sampled the batch) gives a_t and the ratio's denominator
                old_logprobs = (pad_sequence([behaviour_logprobs[i] for i in batch], batch_first=True)
                                if args.num_minibatches > 1 else logprobs.detach())
                teacher_logp = pad_sequence([teacher_logprobs[i] for i in batch], batch_first=True).to(mask.device)
                a = sampled_token_advantage(teacher_logp, old_logprobs, mask)
                w = importance_weights(a, mask, args.gamma, args.iw)  # over the whole response, also when sliced
                loss_mask = slice_mask(mask, args.token_slice)
                tis = (tis_weights(old_logprobs, padded_rows([sampler_logprobs[i] for i in batch], mask), mask,
                                   args.tis_cap) if args.tis_cap > 0 else None)
                loss = opd_loss(logprobs, old_logprobs, w, a, loss_mask, max(loss_tokens, 1),
                                args.clip_low, args.clip_high, tis)
                if tis is not None:
                    sums["tis"] += tis[loss_mask].sum()
                (loss * world).backward()  # FSDP averages gradients over ranks; the loss wants their sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[loss_mask]
                sums["loss"] += loss.detach()  # tensors: no device sync inside the loop
                sums["entropy"] += entropy.detach()[mask].sum()
                sums["clipped"] += ((ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)).sum()
                sums["loss_tokens"] += loss_mask.sum()
                sums["w"] += w[mask].sum()  # weights and discrepancies over all response tokens
                sums["a"] += a[mask].sum()
                sums["abs_a"] += a[mask].abs().sum()
                if mask.any():
                    w_min, w_max = min(w_min, float(w[mask].min())), max(w_max, float(w[mask].max()))
                for row, i in enumerate(batch):  # position-bias signature: |a_t| on the first / last third
                    third = max(1, len(responses[i]) // 3)
                    gap = a[row, :len(responses[i])].abs()
                    if len(responses[i]):  # an empty response has no thirds (it counts as 0)
                        sums["gap_first"] += gap[:third].mean()
                        sums["gap_last"] += gap[len(responses[i]) - third:].mean()
                    if i in shown_rows:
                        shown_rows[i] = (a[row][mask[row]].cpu(), w[row][mask[row]].cpu())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        engine.update_weights(model)

        # ---- 5. metrics, token picture, evaluation, checkpoint
        picture = [picture_row(tokenizer, problems[i // group], responses[i], rewards[i], *shown_rows[i], step + 1)
                   for i in shown_rows]
        sums.update(reward=sum(rewards), sequences=len(rewards), tokens=sum(len(r) for r in responses),
                    careful=sum(writes_work(text) for text in texts),
                    truncated=sum(1 for r in responses if not r or r[-1] not in stop_ids),
                    no_answer=grade_counts["no_answer"], grader_timeouts=grade_counts["timeout"])
        totals = all_reduce_sum(sums)
        extremes = all_gather_cat(torch.tensor([w_min, w_max])).view(-1, 2)  # [ranks, (min, max)]
        w_min, w_max = float(extremes[:, 0].min()), float(extremes[:, 1].max())
        tokens, sequences_global = totals["tokens"], totals["sequences"]
        step_seconds = time.time() - step_started
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics = {
            "reward": totals["reward"] / sequences_global,
            "response_len": tokens / sequences_global,
            "loss": totals["loss"] / args.num_minibatches,
            "entropy": totals["entropy"] / tokens,
            "grad_norm": float(grad_norm),
            "w_mean": totals["w"] / tokens,
            "w_min": w_min,
            "w_max": w_max,
            "a_abs_mean": totals["abs_a"] / tokens,
            "a_mean": totals["a"] / tokens,
            "gap_first_third": totals["gap_first"] / sequences_global,
            "gap_last_third": totals["gap_last"] / sequences_global,
            "careful_frac": totals["careful"] / sequences_global,
            "clip_frac": totals["clipped"] / max(totals["loss_tokens"], 1),
            "tis_weight_mean": totals["tis"] / max(totals["loss_tokens"], 1) if args.tis_cap > 0 else float("nan"),
            "truncated_frac": totals["truncated"] / sequences_global,
            "no_answer": totals["no_answer"],
            "grader_timeouts": totals["grader_timeouts"],
            "step_seconds": step_seconds,
            "tokens_per_second": tokens / step_seconds,
        }
        logger.log(step + 1, metrics)
        last_step = step + 1 == args.num_steps
        stopping = stop.requested()  # on any rank: every rank checkpoints and ends after this step
        if eval_rows and (last_step or (args.eval_every and (step + 1) % args.eval_every == 0)):
            history["last"] = run_eval(step + 1)
        # the final weights always: the last step, or the step a SIGINT/SIGTERM stop ends on
        if last_step or stopping or (args.save_every and (step + 1) % args.save_every == 0):
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer, {"sampler": sampler.state_dict()},
                            dist_info)
        if stopping:
            end_step = step + 1
            break

    # ---- summary ---------------------------------------------------------------------------------
    draw_picture()
    minutes = (time.time() - train_started) / 60
    ended = "done" if end_step == args.num_steps else "stopped"
    summary = f"[iw_opd] {ended}: steps {start_step}->{end_step} in {minutes:.1f} min; runs dir {run_dir}"
    if "first" in history and "last" in history:
        key = f"eval/avg@{eval_k}"
        summary += f"; {key} {history['first'][key]:.3f} -> {history['last'][key]:.3f}"
    print0(summary)
    print0(f"[iw_opd] evaluate its final weights: {eval_command(args, run_dir)}")
    logger.close()
    grader.close()
    return history


if __name__ == "__main__":
    run_main(main)
