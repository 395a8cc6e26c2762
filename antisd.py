"""AntiSD: Anti-Self-Distillation for reasoning RL via pointwise mutual information (arXiv 2605.11609).

Idea. The policy re-reads its own rollout while shown privileged context c (a verified solution plus
a correctness note); per sampled token, teacher and student differ by u_t, the pointwise mutual
information between the token and c. Default self-distillation rewards +u_t, which boosts tokens
that merely follow from knowing the answer and suppresses deliberation ("Wait", "Maybe"); AntiSD
reverses the sign through a bounded Jensen-Shannon shape phi and adds it to the GRPO advantage.
An entropy gate switches the term off while the teacher has collapsed onto a near-deterministic
answer template.

Equations (paper's symbols; sg = stop-gradient):
    A_i^seq = (R_i - mean_G R) / (std_G R + 1e-6)                          GRPO group advantage
    u_{i,t} = log pi_T(y_t | x, c, y_<t) - log pi_S(y_t | x, y_<t)          teacher = policy, no grad
    phi(u)  = 0.5 * (softplus(u) - log 2)                                   phi(0) = 0
    A_{i,t} = A_i^seq - lambda * sg[phi(u_{i,t})]                           u<0 bonus <= 0.5 log 2
    L       = sum_t -min(rho_t A_{i,t}, clip(rho_t, 1-eps_low, 1+eps_high) A_{i,t}) / N_tokens
    gate:   lambda = 0 for the first `gate_warmup` steps, which record the median teacher entropy;
            H_warm = their median. Then the gate closes when H < tau_down * H_warm and re-opens
            when H >= H_warm (hysteresis); open -> lambda = lambda_max.

Where the numbers come from: [paper] the AntiSD paper; [2nd] a secondary write-up; [ours] our
choice where the sources are silent. Paper setting [paper]: DAPO-Math-17k, 200 steps, 32 problems
x 8 rollouts, AdamW lr 1e-6, 32K tokens, lambda_max 0.5, 5 warm-up steps, tau_down 0.93; eval
avg@32 on AIME24/25/26 and HMMT25, avg@4 on Minerva, temperature 0.7, top-p 0.95. The median as
the gate's entropy statistic is [2nd]; the teacher-context template is [ours]. Temperature: every
log-prob and entropy here (student, behaviour policy, and the self-teacher shown c) is taken under
softmax(logits / --temperature), the distribution the rollouts were drawn from, as verl and TRL do
[code of the peers]; teacher and student share it, so u_t stays the PMI of one tempered policy with
and without c (T = 1, the default, divides by nothing). The defaults below
suit the built-in toy task (larger learning rate, short responses) [ours]; the README gives the
paper's command.

Run:
    python antisd.py                                        # toy task, CPU, a few minutes
    torchrun --nproc_per_node 2 antisd.py --num_steps 3     # two CPU ranks (gloo, FSDP2)
    python antisd.py --lambda_max 0                         # GRPO baseline
    python antisd.py --signal sd                            # default self-distillation (+u_t, no gate)
    python antisd.py --divergence rkl                       # reverse-KL ascent ablation (-u_t)
    python antisd.py --gate none                            # no entropy gate
    python antisd.py --eval_only --model <ckpt or hub id> --eval_dataset aime24,aime25,aime26,hmmt25,minerva
                                                            # one table, avg@32 / avg@4 [paper protocol]
Paper (Qwen3-8B, one 8-GPU node; then the paper's table, avg@32 / avg@4 at T 0.7, top-p 0.95):
    torchrun --nproc_per_node 8 antisd.py --model Qwen3-8B --dataset dapo --eval_dataset math500 \\
        --num_steps 200 --num_problems 32 --num_generations 8 --lr 1e-6 --max_new_tokens 32768 \\
        --activation_checkpointing --eval_every 20 --eval_k 4 --save_every 20
    python antisd.py --eval_only --resume --run_name <run> --model Qwen3-8B --max_new_tokens 32768 \\
        --eval_dataset aime24,aime25,aime26,hmmt25,minerva
On a GPU `--rollout auto` samples with vLLM (README, "vLLM rollouts"); `--tis_cap 2` adds the
sampler/trainer correction.
On the toy task (README, "The toy testbed") the premise is built in: the plain prompt mostly takes the
shortcut (box the answer at once), the careful strategy (steps, check lines) is more accurate, and the
self-teacher shown an answer prefers the shortcut, so u < 0 on deliberation and u > 0 on the answer
(logged every step as u_work / u_answer). The toy tests whether this code turns that premise into
the paper's effect, not whether the premise holds for real models.
"""

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from common import (GracefulStop, Grader, ProblemSampler, RunLogger, RunOptions, SamplingParams,
                    UserError, all_gather_cat, all_reduce_sum, answer_span, at_least, between,
                    build_prompt, eval_command, eval_dataset_names, eval_only_table, evaluate,
                    grader_for, init_distributed, load_checkpoint, load_eval_benchmarks, load_model,
                    load_run_problems, load_tokenizer, make_engine, micro_batches,
                    off_eval_schedule, option, padded_rows, parse_args, parse_eval_k,
                    prepare_run_dir, print0, resolve_model, response_logprobs, response_token_spans,
                    run_main, save_checkpoint, stop_token_ids, token_roles, validate_args,
                    vllm_options, write_token_picture, writes_work)

# Privileged context c [paper: verified solution + correctness feedback; wording ours]. The toy
# models are taught this exact form (common.TOY_CONTEXT_HEADER / TOY_FEEDBACK_LINES).
TEACHER_CONTEXT = "Reference solution:\n{solution}\n\n{feedback}"
FEEDBACK = {True: "Your previous attempt was correct.", False: "Your previous attempt was incorrect."}


# Valid ranges of AntiSD's own options; the shared options' ranges are common.ARG_RULES.
RULES = {
    "num_generations": ((lambda g: g >= 2), ">= 2 (GRPO's baseline is the group mean of at least 2 rollouts)"),
    "lambda_max": at_least(0),
    "gate_warmup": at_least(0),
    "tau_down": between(0, 1, low_open=True),
    "picture_rollouts": at_least(0),
}


# Evaluation protocol [paper]: avg@32 on AIME24/25/26 and HMMT25, avg@4 on Minerva (common.DATASETS has
# these as defaults); the other benchmarks keep the table's k.
EVAL_PROTOCOL = {"aime24": 32, "aime25": 32, "aime26": 32, "hmmt25": 32, "minerva": 4}
# tokens.html colour scales, fixed so pictures of different steps and runs compare [ours]
U_SCALE = (-1.0, 1.0)  # u_t in nats: saturated at an e-fold probability ratio
ADVANTAGE_SCALE = (-2.0, 2.0)  # GRPO's A_t in group standard deviations


# The step's stdout line (<= 120 columns): the gate's lambda, the premise; all: metrics.jsonl
STEP_LINE = ("reward", "lambda", "u_work", "u_answer", "step_seconds")


@dataclass
class Args(RunOptions):
    # AntiSD
    lambda_max: float = option(0.5, "weight of the token term when the gate is open [paper]; 0 = GRPO")
    signal: Literal["antisd", "sd"] = option("antisd", "antisd: -phi(u) or -u; sd: +u, no gate [paper]")
    divergence: Literal["jsd", "rkl"] = option("jsd", "antisd shape: jsd = -phi(u) [paper], rkl = -u ablation [paper]")
    gate: Literal["entropy", "none"] = option("entropy", "entropy gate with hysteresis [paper], or none")
    gate_warmup: int = option(5, "steps with lambda = 0 that calibrate H_warm [paper]")
    tau_down: float = option(0.93, "gate closes below tau_down * H_warm [paper; ablations 0.90, 0.95]")
    # shared by every script, with this paper's defaults and sources (the rest: common.RunOptions)
    model: str = option("toy", "policy: toy | toy-large | alias (Qwen3-8B, ...) | hub id | local dir")
    dataset: str = option("toy", "train problems: toy | DAPO-Math-17k hub id | hub id | .jsonl/.json/.parquet")
    solution_key: str = option("solution", "column with a reference solution (optional)")
    num_steps: int = option(60, "optimizer steps [paper: 200; ours: 60 on the toy]")
    run_name: str = option("", "run directory under --output_dir; default "
                           "antisd_<model>_s<seed>_<start time>")
    # rollouts
    num_problems: int = option(32, "problems per step, global [paper: 32]")
    num_generations: int = option(8, "rollouts per problem G [paper: 8]")
    max_new_tokens: int = option(64, "response token limit [paper: 32K; ours: 64 on the toy]")
    temperature: float = option(1.0, "rollout sampling temperature [ours]")
    top_p: float = option(1.0, "rollout nucleus sampling [ours]")
    top_k: int = option(0, "rollout top-k, 0 = off [ours]")
    enable_thinking: Optional[bool] = option(None, "Qwen3 chat template thinking switch (unset = template default)")
    gen_batch_size: int = option(256, "sequences per generation batch of the hf engine [ours: one batch for 32 x 8]")
    # optimisation
    lr: float = option(1e-4, "AdamW learning rate [paper: 1e-6; ours: 1e-4 for the tiny toy model]")
    max_grad_norm: float = option(1.0, "gradient-norm clip [paper setting via verl]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low [paper setting via verl]")
    clip_high: float = option(0.28, "PPO ratio clip eps_high, DAPO clip-higher [paper setting via verl]")
    scale_rewards: bool = option(True, "divide group advantages by the group std (false = Dr.GRPO)")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")
    logprob_chunk_size: int = option(512, "positions per chunk of the full-vocabulary log-prob/entropy")
    # evaluation, checkpoints
    eval_k: str = option("", "samples per eval problem (avg@k, pass@k): empty = each benchmark's default "
                         "(EVAL_PROTOCOL, toy 4) | one int | name=k pairs, e.g. aime24=32,math500=4")
    eval_temperature: float = option(0.7, "eval sampling temperature [paper]")
    eval_top_p: float = option(0.95, "eval nucleus sampling [paper]")
    eval_top_k: int = option(0, "eval top-k, 0 = off [paper: not used]")
    picture_rollouts: int = option(16, "rollouts of the latest step drawn in tokens.html (at each eval and the end)")


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_rewards: bool = True) -> torch.Tensor:
    """A_i^seq for rewards [problems, G]: group-centred, divided by the group's (sample) std + 1e-6.
    A group whose rewards are all equal gets 0 (no NaN)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-6) if scale_rewards else centred


def phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 0.5 (softplus(u) - log 2): the JSD-derived shape; phi(0) = 0, phi(u) > -0.5 log 2."""
    return 0.5 * (F.softplus(u) - math.log(2.0))


def token_signal(u: torch.Tensor, signal: str = "antisd", divergence: str = "jsd") -> torch.Tensor:
    """delta_t, the dense per-token credit added to A^seq with weight lambda."""
    if signal == "sd":
        return u  # default self-distillation: reverse-KL descent rewards +u_t
    return -u if divergence == "rkl" else -phi(u)  # AntiSD: reverse-KL ascent or JSD ascent


def policy_loss(logprobs, old_logprobs, advantages, mask, num_tokens, clip_low=0.2, clip_high=0.28, tis=None):
    """Clipped surrogate summed over valid tokens, divided by the global valid-token count.
    Summing this over micro-batches and ranks gives the global token-mean for any split.
    `tis`: per-token truncated importance weights (`tis_weights`) multiplying each token's term."""
    ratio = torch.exp(logprobs - old_logprobs)
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


@dataclass
class EntropyGate:
    """Schmitt trigger on the step's median teacher entropy H. `update` returns whether lambda is on."""

    warmup: int = 5
    tau_down: float = 0.93
    warm_values: list = field(default_factory=list)
    h_warm: Optional[float] = None
    open: bool = True

    def update(self, step: int, entropy: float) -> bool:
        if step < self.warmup:  # calibration: lambda = 0, record H
            self.warm_values.append(entropy)
            return False
        if self.h_warm is None:
            self.h_warm = statistics.median(self.warm_values)
        if self.open and entropy < self.tau_down * self.h_warm:
            self.open = False
        elif not self.open and entropy >= self.h_warm:
            self.open = True
        return self.open


def verified_solution(text: str) -> Optional[str]:
    """What a teacher may see of a correct rollout: text after any </think>, cut after the final
    \\boxed{} (the whole outermost one when boxes are nested)."""
    text = text.split("</think>")[-1]
    span = answer_span(text)
    return text[: span[1]].strip() if span else None


def teacher_contexts(texts: list[str], rewards: list[float], group_size: int, problems: list[dict],
                     rng: random.Random) -> list[str]:
    """Privileged context c for every rollout: a verified solution from a *different* successful
    rollout of the same group, else the reference solution (else the answer), plus feedback."""
    contexts = []
    for i, text in enumerate(texts):
        group = range(i - i % group_size, i - i % group_size + group_size)
        others = [s for j in group if j != i and rewards[j] > 0 and (s := verified_solution(texts[j]))]
        problem = problems[i // group_size]
        solution = rng.choice(others) if others else (problem["solution"] or f"\\boxed{{{problem['answer']}}}")
        contexts.append(TEACHER_CONTEXT.format(solution=solution, feedback=FEEDBACK[rewards[i] > 0]))
    return contexts


ROLE_IDS = {"other": 0, "work": 1, "answer": 2}


def role_ids(tokenizer, response: list[int]) -> torch.Tensor:
    """Per token of a response: 1 = work (deliberation, check lines), 2 = the final answer, 0 = other.
    Logged so every run shows the premise: u < 0 on work tokens and u > 0 on answer tokens."""
    return torch.tensor([ROLE_IDS[r] for r in token_roles(*response_token_spans(tokenizer, response))])


def picture_row(tokenizer, problem: dict, response: list[int], reward: float, values: torch.Tensor,
                bonus: Optional[torch.Tensor], step: int) -> dict:
    """One row of tokens.html: the response's tokens coloured by `values` (u_t), the bonus on hover."""
    text, spans = response_token_spans(tokenizer, response)
    return {"tokens": [text[a:b] for a, b in spans], "values": values.tolist(),
            "hover": [f"bonus={b:+.3f}" for b in bonus.tolist()] if bonus is not None else None,
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
    sequences = args.num_problems // world * args.num_generations
    if sequences % args.num_minibatches:
        raise UserError(f"--num_minibatches {args.num_minibatches} must divide the {sequences} rollouts per rank.")
    if args.gate == "entropy" and args.signal == "antisd" and args.gate_warmup < 1:
        raise UserError("--gate entropy needs --gate_warmup >= 1 to calibrate H_warm (or use --gate none).")
    # refuses to reuse a run directory; picks the newest valid checkpoint for --resume
    run = prepare_run_dir(args, f"antisd_{Path(args.model).name}_s{args.seed}", dist_info)
    run_dir, run_name = run.path, run.path.name
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # ---- data (prompts longer than the context allows are skipped), model, optimizer, engine ----
    tokenizer = load_tokenizer(args.model)
    train_rows, eval_rows = load_run_problems(args, tokenizer) if not args.eval_only else ([], [])
    benchmarks = load_eval_benchmarks(args, tokenizer) if args.eval_only else []  # (name, rows) each
    model = load_model(str(run.checkpoint or args.model), dist_info,
                       activation_checkpointing=args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    engine = make_engine(args.rollout, model, tokenizer, args.gen_batch_size, args.gen_batch_tokens,
                         dist_info=dist_info, model_path=str(run.checkpoint or resolve_model(args.model)),
                         vllm_options=vllm_options(args))
    grader = Grader(args.grader_timeout)
    sampler = ProblemSampler(len(train_rows), args.seed)
    gate = EntropyGate(args.gate_warmup, args.tau_down)
    start_step = 0
    if run.checkpoint is not None:
        restored = load_checkpoint(run.checkpoint, model, optimizer, dist_info)
        start_step = restored["step"]
        sampler.load_state_dict(restored["state"]["sampler"])
        gate = EntropyGate(**restored["state"]["gate"])
        print0(f"[resume] continuing {run_dir} from step {start_step}")
    logger = RunLogger(run_dir, args, dist_info, args.track, resume_step=run.resume_step,
                       step_line=STEP_LINE)
    rollout_params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    eval_params = SamplingParams(args.eval_temperature, args.eval_top_p, args.eval_top_k, args.max_new_tokens)
    pad_id, stop_ids = tokenizer.pad_token_id, stop_token_ids(tokenizer, model)
    use_gate = args.gate == "entropy" and args.signal == "antisd"  # --signal sd runs without a gate [paper]
    use_teacher = args.lambda_max != 0  # --lambda_max 0 is GRPO: the token term is never on, no teacher pass

    picture = []  # rows of tokens.html from the latest step (rank 0)

    def run_eval(step: int) -> dict:
        metrics = evaluate(engine, tokenizer, eval_rows, grader_for(eval_rows, grader), eval_params, eval_k, dist_info,
                           args.enable_thinking,
                           own_rng=off_eval_schedule(step, args.eval_every))
        logger.log(step, metrics, prefix="eval")
        draw_picture()
        return metrics

    def draw_picture():
        if not (picture and dist_info.is_main):
            return
        if use_teacher:
            note = ("u_t = log pi_T(y_t|x,c) - log pi_S(y_t|x) in nats: red = the teacher shown "
                    "a verified solution likes the token more (AntiSD penalises it), blue = less "
                    "(bonus).")
            write_token_picture(run_dir / "tokens.html", picture, "u_t", U_SCALE,
                                title=f"{run_name}: u_t per token", note=note)
        else:  # GRPO: no teacher, so the advantage each token gets
            note = ("GRPO (--lambda_max 0, no teacher pass): every token of a rollout gets its "
                    "group advantage A_i (in group standard deviations); red = reinforced, blue = "
                    "discouraged.")
            write_token_picture(run_dir / "tokens.html", picture, "A_t", ADVANTAGE_SCALE,
                                title=f"{run_name}: advantage per token", note=note)

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
    group = args.num_generations
    budget = (args.micro_batch_size, args.micro_batch_tokens)  # sequences and padded tokens per forward
    print0(f"[antisd] {run_name}: {args.num_steps} steps x {args.num_problems} problems x {group} rollouts "
           f"on {world} rank(s), device {dist_info.device}")
    train_started = time.time()
    stop = GracefulStop()  # SIGINT/SIGTERM from here: end after the current step, checkpointed
    end_step = args.num_steps  # the step reached: earlier after a SIGINT/SIGTERM stop
    for step in range(start_step, args.num_steps):
        step_started = time.time()

        # ---- 1. rollouts: G samples per problem; this rank takes its slice of the global batch
        indices = sampler.next(args.num_problems)[rank * problems_per_rank:(rank + 1) * problems_per_rank]
        problems = [train_rows[i] for i in indices]
        prompts = [build_prompt(tokenizer, p["problem"], enable_thinking=args.enable_thinking) for p in problems]
        student_prompts = [prompt for prompt in prompts for _ in range(group)]  # rollout i: problem i // G
        if args.tis_cap > 0:  # the sampler's own log-probs, for the sampler/trainer correction
            responses, sampler_logprobs = engine.generate(student_prompts, rollout_params, desc="rollout",
                                                          logprobs=True)
        else:
            responses = engine.generate(student_prompts, rollout_params, desc="rollout")
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)

        # ---- 2. verifier rewards and GRPO group advantages A_i^seq
        rewards, grade_counts = grader.grade(texts, [p["answer"] for p in problems for _ in range(group)])
        reward_groups = torch.tensor(rewards).view(problems_per_rank, group)
        sequence_advantages = group_advantages(reward_groups, args.scale_rewards).flatten()
        shown_rows = dict.fromkeys(range(min(args.picture_rollouts, len(responses)) if rank == 0 else 0))

        # ---- 3. privileged context c from another successful rollout of the group; teacher prompts
        if use_teacher:
            context_rng = random.Random(f"{args.seed}/{step}/{rank}")  # a function of the step: resume-exact
            contexts = teacher_contexts(texts, rewards, group, problems, context_rng)
            teacher_prompts = [build_prompt(tokenizer, problems[i // group]["problem"], contexts[i],
                                            enable_thinking=args.enable_thinking) for i in range(len(responses))]
            # token roles of correct rollouts, for the premise metrics u_work / u_answer (others: all 0)
            roles = [role_ids(tokenizer, r) if rewards[i] > 0 else torch.zeros(len(r), dtype=torch.long)
                     for i, r in enumerate(responses)]

        # ---- 4. no-grad pass: teacher log-probs and entropies (the live policy shown c); the
        # behaviour policy's log-probs are needed separately only when a batch gets several updates
        rollouts = range(len(responses))
        student_lengths = [len(student_prompts[i]) + len(responses[i]) for i in rollouts]
        # per rollout i: a [len(responses[i])] tensor
        teacher_logprobs, teacher_entropy, behaviour_logprobs = ([None] * len(rollouts) for _ in range(3))
        with torch.no_grad():
            if use_teacher:
                teacher_lengths = [len(teacher_prompts[i]) + len(responses[i]) for i in rollouts]
                for batch in micro_batches(rollouts, teacher_lengths, *budget, same_count=True):
                    logprobs, entropy, mask = response_logprobs(
                        model, [teacher_prompts[i] for i in batch], [responses[i] for i in batch], pad_id,
                        args.logprob_chunk_size, temperature=args.temperature)
                    for i, row, row_entropy, row_mask in zip(batch, logprobs, entropy, mask):
                        teacher_logprobs[i], teacher_entropy[i] = row[row_mask], row_entropy[row_mask]
            if args.num_minibatches > 1:
                for batch in micro_batches(rollouts, student_lengths, *budget, same_count=True):
                    logprobs, _, mask = response_logprobs(
                        model, [student_prompts[i] for i in batch], [responses[i] for i in batch], pad_id,
                        args.logprob_chunk_size, temperature=args.temperature)
                    for i, row, row_mask in zip(batch, logprobs, mask):
                        behaviour_logprobs[i] = row[row_mask]

        # ---- 5. entropy gate on the median teacher entropy of the global batch
        if use_teacher:
            median_teacher_entropy = float(np.median(all_gather_cat(torch.cat(teacher_entropy)).numpy()))
            gate_on = gate.update(step, median_teacher_entropy) if use_gate else True
        else:  # GRPO: no teacher, no gate
            median_teacher_entropy, gate_on = float("nan"), False
        lam = args.lambda_max if gate_on else 0.0

        # ---- 6. policy gradient on A_{i,t} = A_i^seq + lambda * sg[delta_t], global token-mean
        model.train()
        sums = dict.fromkeys(["loss", "entropy", "u_negative", "bonus", "u", "clipped", "u_work", "work_tokens",
                              "u_answer", "answer_tokens", "tis"], 0.0)
        if not use_teacher:  # no u without a teacher
            sums.update(u_negative=float("nan"), u=float("nan"), u_work=float("nan"), u_answer=float("nan"))
        per_minibatch = len(responses) // args.num_minibatches
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            minibatch_tokens = all_reduce_sum(sum(len(responses[i]) for i in owned)).item()
            for batch in micro_batches(owned, student_lengths, *budget, same_count=True):
                logprobs, entropy, mask = response_logprobs(
                    model, [student_prompts[i] for i in batch], [responses[i] for i in batch], pad_id,
                    args.logprob_chunk_size, temperature=args.temperature)
                # the behaviour policy (the weights that sampled the batch) gives the ratio's denominator
                old_logprobs = (pad_sequence([behaviour_logprobs[i] for i in batch], batch_first=True)
                                if args.num_minibatches > 1 else logprobs.detach())
                advantages = sequence_advantages[batch].to(mask.device)[:, None].expand(mask.shape)
                if use_teacher:  # u_t = log pi_T(y_t | x, c, y<t) - log pi_S(y_t | x, y<t), behaviour policy
                    teacher = pad_sequence([teacher_logprobs[i] for i in batch], batch_first=True)
                    u = torch.where(mask, teacher - old_logprobs, 0.0)
                    bonus = lam * token_signal(u, args.signal, args.divergence)
                    advantages = advantages + bonus
                    sums["u_negative"] += (u[mask] < 0).sum()
                    sums["u"] += u[mask].sum()
                    sums["bonus"] += bonus[mask].sum()
                    role = pad_sequence([roles[i] for i in batch], batch_first=True).to(u.device)
                    role = F.pad(role, (0, u.shape[1] - role.shape[1]))
                    for name, role_id in [("work", 1), ("answer", 2)]:
                        sums[f"u_{name}"] += u[role == role_id].sum()
                        sums[f"{name}_tokens"] += (role == role_id).sum()
                tis = (tis_weights(old_logprobs, padded_rows([sampler_logprobs[i] for i in batch], mask), mask,
                                   args.tis_cap) if args.tis_cap > 0 else None)
                loss = policy_loss(logprobs, old_logprobs, advantages, mask, minibatch_tokens,
                                   args.clip_low, args.clip_high, tis)
                if tis is not None:
                    sums["tis"] += tis[mask].sum()
                (loss * world).backward()  # FSDP averages gradients over ranks; the loss wants their sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[mask]
                sums["loss"] += loss.detach()  # tensors: no device sync inside the loop
                sums["entropy"] += entropy.detach()[mask].sum()
                sums["clipped"] += ((ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)).sum()
                for row, i in enumerate(batch):  # the token picture: u_t and the bonus (GRPO: the advantage)
                    if i in shown_rows:
                        values, hover = (u[row], bonus[row]) if use_teacher else (advantages[row], None)
                        shown_rows[i] = (values[mask[row]].cpu(), hover[mask[row]].cpu() if use_teacher else None)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        engine.update_weights(model)

        # ---- 7. metrics, token picture, evaluation, checkpoint
        picture = [picture_row(tokenizer, problems[i // group], responses[i], rewards[i], *shown_rows[i], step + 1)
                   for i in shown_rows]
        sums.update(reward=sum(rewards), sequences=len(rewards), tokens=sum(len(r) for r in responses),
                    careful=sum(writes_work(text) for text in texts),
                    truncated=sum(1 for r in responses if not r or r[-1] not in stop_ids),
                    zero_adv_groups=int((reward_groups.max(1).values == reward_groups.min(1).values).sum()),
                    no_answer=grade_counts["no_answer"], grader_timeouts=grade_counts["timeout"])
        totals = all_reduce_sum(sums)
        tokens, sequences_global = totals["tokens"], totals["sequences"]
        step_seconds = time.time() - step_started
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        metrics = {
            "reward": totals["reward"] / sequences_global,
            "response_len": tokens / sequences_global,
            "loss": totals["loss"] / args.num_minibatches,
            "entropy": totals["entropy"] / tokens,
            "grad_norm": float(grad_norm),
            "gate_open": float(gate_on),
            "lambda": lam,
            "H_warm": gate.h_warm if (use_gate and gate.h_warm is not None) else float("nan"),
            "teacher_entropy_median": median_teacher_entropy,
            "u_neg_frac": totals["u_negative"] / tokens,
            "u_mean": totals["u"] / tokens,
            "token_bonus_mean": totals["bonus"] / tokens,
            "u_work": totals["u_work"] / totals["work_tokens"] if totals["work_tokens"] else float("nan"),
            "u_answer": totals["u_answer"] / totals["answer_tokens"] if totals["answer_tokens"] else float("nan"),
            "careful_frac": totals["careful"] / sequences_global,
            "clip_frac": totals["clipped"] / tokens,
            "tis_weight_mean": totals["tis"] / tokens if args.tis_cap > 0 else float("nan"),
            "truncated_frac": totals["truncated"] / sequences_global,
            "zero_adv_groups": totals["zero_adv_groups"] / args.num_problems,
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
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer,
                            {"sampler": sampler.state_dict(), "gate": asdict(gate)}, dist_info)
        if stopping:
            end_step = step + 1
            break

    # ---- summary ---------------------------------------------------------------------------------
    draw_picture()
    minutes = (time.time() - train_started) / 60
    ended = "done" if end_step == args.num_steps else "stopped"
    summary = f"[antisd] {ended}: steps {start_step}->{end_step} in {minutes:.1f} min; runs dir {run_dir}"
    if "first" in history and "last" in history:
        key = f"eval/avg@{eval_k}"
        summary += f"; {key} {history['first'][key]:.3f} -> {history['last'][key]:.3f}"
    print0(summary)
    print0(f"[antisd] evaluate its final weights: {eval_command(args, run_dir)}")
    logger.close()
    grader.close()
    return history


if __name__ == "__main__":
    run_main(main)
