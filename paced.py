"""PACED: pass-rate-weighted distillation and self-distillation (arXiv 2603.11178).

Idea. Distillation spends most of its gradient on problems the student already solves every time or
never solves. The paper measures the cross-problem gradient signal-to-noise ratio and finds it
bell-shaped over the student's pass rate p, collapsing at p = 0 and p = 1. PACED therefore weights
each problem's distillation loss by a Beta kernel of its pass rate, so training concentrates on the
frontier of competence. Two settings: distillation from a larger frozen teacher (teacher-forced on a
reference the teacher samples), and on-policy self-distillation (the student, shown the expert
solution, is the teacher of its own rollouts).

Equations (per problem x_i of the global batch, sg = stop-gradient):
    p_i    = (1/K) sum_k R(x_i, y_ik)          pass rate over K student rollouts (this step's weights)
    w_i    = p_i^alpha (1 - p_i)^beta          (--weighting beta; p in {0,1} -> 0, no teacher forward)
             1 if 0 < p_i < 1 else 0           (--weighting hard, the hard-filter baseline)
             1                                 (--weighting none, unweighted distillation: every problem)
    w~_i   = w_i / mean_batch(w)               (global batch mean over all ranks)
    D_t    = full-vocabulary divergence at token t:
             fkl = KL(pi_T || pi_S), rkl = KL(pi_S || pi_T), fkl_then_rkl = fkl for the first
             --switch_step steps then rkl, akl = c_head fkl + c_tail rkl (below)
    L_i    = mean over problem i's trained tokens of D_t
             (distill: the teacher's reference; self: all K of the student's own rollouts)
    L      = (1/N) sum_i w~_i L_i = sum_i w_i L_i / sum_i w_i      (N = problems in the global batch)
AKL (Wu et al. 2024, the paper's baseline): sort the teacher's vocabulary by p_T, descending; the head
is the tokens whose running probability sum (their own included) stays at or below 0.5, and the
top-1 token always; the token whose sum first exceeds 0.5 starts the tail [code: the authors'
AKL.py]; g_head = sum_head |p_T - p_S|, g_tail = sum_tail |p_T - p_S|; c_head = g_head / (g_head +
g_tail), c_tail = 1 - c_head, both without gradient [ours: sg, and c_head = 0.5 when g_head +
g_tail = 0, where both KLs are 0 anyway].

Where the numbers come from: [paper] the PACED paper; [code] the authors' AKL.py; [ours] our
choice where they are silent. [paper]: w(p) = p^alpha (1-p)^beta with alpha = beta = 1; p from K
student rollouts; the two settings; forward KL for distillation, the two-stage fkl -> rkl schedule,
the AKL and unweighted baselines; the SNR diagnostic (norm of the mean per-problem gradient over
the RMS deviation, per pass-rate bin). [ours]: K = 8, dividing the weights by their batch mean, the
hard-filter weight 1, --switch_step 30, the bins of the histogram and the SNR, all the toy defaults
(16 problems x 8 rollouts, lr 2e-4, 60 steps, 64 tokens). `--weighting none` keeps p in {0,1} (the
paper's "unweighted baseline": every problem weight 1). --temperature shapes sampling only
(student rollouts, teacher references): the divergences compare the two models' own full
distributions at T = 1, the teacher's distribution being the distillation target, and no
sampled-token log-prob enters the loss [ours; TRL's GKD divides both models' logits by its
temperature instead].

Run:
    python paced.py                                        # distill toy <- toy-large, PACED weights, CPU
    python paced.py --mode self                            # self-distillation (teacher = student + solution)
    python paced.py --weighting none                       # unweighted distillation
    python paced.py --eval_only --model <ckpt> --eval_dataset math500,aime24,aime25  # avg@8 table [paper]
    python paced.py --weighting hard                       # hard filter 0 < p < 1
    python paced.py --kl akl --weighting none              # AKL baseline
    python paced.py --kl fkl_then_rkl --switch_step 30     # two-stage schedule
    python paced.py --log_snr 10                           # SNR per pass-rate bin every 10 steps (1 rank)
    torchrun --nproc_per_node 2 paced.py --num_steps 3     # two CPU ranks (gloo, FSDP2)
Paper (distillation, Qwen3-1.7B from Qwen3-8B, one 8-GPU node; teacher, data, steps, lr [ours]; then
the paper's avg@8 on MATH-500, AIME 2024 and AIME 2025 [paper]):
    torchrun --nproc_per_node 8 paced.py --mode distill --model Qwen/Qwen3-1.7B \\
        --teacher_model Qwen/Qwen3-8B --dataset dapo --eval_dataset math500 --k 8 --num_steps 200 \\
        --num_problems 64 --lr 1e-6 --max_new_tokens 8192 --temperature 0.7 --top_p 0.95 \\
        --micro_batch_size 4 --activation_checkpointing --eval_every 20 --save_every 20
    python paced.py --eval_only --resume --run_name <run> --eval_dataset math500,aime24,aime25
"""

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from common import (GracefulStop, Grader, ProblemSampler, RunLogger, RunOptions, SamplingParams,
                    TOY_CONTEXT_HEADER, UserError, all_gather_cat, all_reduce_sum, at_least,
                    build_prompt, check_same_tokenizer, chunked_map, eval_command,
                    eval_dataset_names, eval_only_table, evaluate, grader_for, init_distributed,
                    load_checkpoint, load_eval_benchmarks, load_model, load_run_problems,
                    load_tokenizer, make_engine, micro_batches, off_eval_schedule, option,
                    output_head, padded_rows, parse_args, parse_eval_k, prepare_run_dir, print0,
                    resolve_model, response_hidden, response_logprobs, response_token_spans,
                    run_main, save_checkpoint, validate_args, vllm_options, write_token_picture,
                    writes_work)

AKL_HEAD_MASS = 0.5  # cumulative teacher probability of the AKL head [Wu et al. 2024]
# pass-rate bins of the histogram and the SNR [ours]: p = 0, (0, .25], (.25, .5], (.5, .75], (.75, 1), p = 1
BINS = ["p0", "p0-25", "p25-50", "p50-75", "p75-100", "p1"]
BIN_LABELS = ["p = 0", "(0, .25]", "(.25, .5]", "(.5, .75]", "(.75, 1)", "p = 1"]  # snr.png's axis
D_SCALE = (0.0, 1.0)  # tokens.html: D_t >= 0 in nats, white at 0, saturated at 1; fixed [ours]
ROWS = {"distill": "the teacher's reference", "self": "the student's rollout"}  # tokens.html rows

RULES = {
    "k": at_least(1),
    "alpha": at_least(0),
    "beta": at_least(0),
    "switch_step": at_least(0),
    "log_snr": at_least(0),
    "picture_rollouts": at_least(0),
}


# Evaluation protocol [paper]: mean accuracy over 8 samples on MATH-500, AIME 2024 and AIME 2025.
EVAL_PROTOCOL = {"math500": 8, "aime24": 8, "aime25": 8}


# The step's stdout line (<= 120 columns): the pass-rate weights; all: metrics.jsonl
STEP_LINE = ("reward", "loss", "weight_mean", "kl_trained", "step_seconds")


@dataclass
class Args(RunOptions):
    # method
    mode: Literal["distill", "self"] = option("distill", "distill: frozen --teacher_model samples a reference, "
                                                         "teacher-forced KL on it; self: the student shown the "
                                                         "expert solution scores the student's rollouts [paper]")
    teacher_model: str = option("toy-large", "distill mode's frozen teacher, same tokenizer as --model")
    k: int = option(8, "student rollouts per problem for the pass rate [paper: K; ours: 8]")
    alpha: float = option(1.0, "w(p) = p^alpha (1-p)^beta [paper: 1]")
    beta: float = option(1.0, "w(p) = p^alpha (1-p)^beta [paper: 1]")
    weighting: Literal["beta", "none", "hard"] = option("beta", "beta = PACED, none = unweighted, hard = weight 1 "
                                                                "for 0 < p < 1 [paper baselines]")
    kl: Literal["fkl", "rkl", "fkl_then_rkl", "akl"] = option("fkl", "divergence [paper]")
    switch_step: int = option(30, "fkl_then_rkl: the first N steps use fkl, the rest rkl [ours: 30]")
    log_snr: int = option(0, "every N steps log the cross-problem gradient SNR per pass-rate bin (1 rank); 0 = off")
    # shared by every script, with this paper's defaults and sources (the rest: common.RunOptions)
    model: str = option("toy", "student: toy | toy-large | alias (Qwen3-0.6B, ...) | hub id | local dir")
    dataset: str = option("toy", "train problems: toy | hub id | .jsonl/.json/.parquet")
    solution_key: str = option("solution", "column with the expert solution (the self-teacher's context)")
    num_steps: int = option(60, "optimizer steps [ours: 60 on the toy]")
    run_name: str = option("", "run directory under --output_dir; default "
                           "paced_<mode>_<model>_s<seed>_<start time>")
    # rollouts
    num_problems: int = option(16, "problems per step, global [ours: 16 on the toy]")
    max_new_tokens: int = option(64, "response token limit [ours: 64 on the toy]")
    temperature: float = option(1.0, "student and teacher sampling temperature [ours]")
    top_p: float = option(1.0, "nucleus sampling [ours]")
    top_k: int = option(0, "top-k, 0 = off")
    enable_thinking: Optional[bool] = option(None, "Qwen3 chat template thinking switch")
    gen_batch_size: int = option(256, "sequences per generation batch of the hf engine [ours]")
    # optimisation
    lr: float = option(2e-4, "AdamW learning rate [ours: 2e-4 for the tiny toy model]")
    max_grad_norm: float = option(1.0, "gradient-norm clip [ours]")
    logprob_chunk_size: int = option(512, "positions per chunk of the full-vocabulary divergence")
    # evaluation, checkpoints
    eval_k: str = option("", "samples per eval problem (avg@k, pass@k): empty = each benchmark's default "
                         "(EVAL_PROTOCOL, toy 4) | one int | name=k pairs, e.g. aime24=32,math500=4")
    eval_temperature: float = option(0.7, "eval sampling temperature [ours]")
    eval_top_p: float = option(0.95, "eval nucleus sampling [ours]")
    eval_top_k: int = option(0, "eval top-k, 0 = off")
    picture_rollouts: int = option(16, "trained sequences of the latest step drawn in tokens.html")


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions
# ---------------------------------------------------------------------------------------------


def beta_weight(p: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """w(p) = p^alpha (1-p)^beta [paper], and 0 at p in {0, 1} for every alpha, beta (also alpha or
    beta = 0, where 0^0 would give 1): problems solved always or never are skipped."""
    p = torch.as_tensor(p, dtype=torch.float64)
    w = p.pow(alpha) * (1 - p).pow(beta)
    return torch.where((p > 0) & (p < 1), w, torch.zeros_like(w))


def problem_weights(p: torch.Tensor, weighting: str = "beta", alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Raw per-problem weights: `beta` = w(p); `hard` = 1 for 0 < p < 1, else 0; `none` = 1 everywhere."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if weighting == "none":
        return torch.ones_like(p)
    if weighting == "hard":
        return ((p > 0) & (p < 1)).to(p.dtype)
    return beta_weight(p, alpha, beta)


def normalise_weights(w: torch.Tensor, batch_sum: float | None = None, batch_count: int | None = None) -> torch.Tensor:
    """w / mean(w) over the (global) batch: `batch_sum`/`batch_count` are the all-reduced sum and count
    (default: this tensor's). A batch whose weights are all 0 stays all 0 (nothing is trained)."""
    total = float(w.sum()) if batch_sum is None else batch_sum
    count = len(w) if batch_count is None else batch_count
    return w * (count / total) if total > 0 else torch.zeros_like(w)


def active_divergence(kl: str, step: int, switch_step: int) -> str:
    """The divergence of optimizer step `step` (0-based): fkl_then_rkl is fkl for steps 0..switch_step-1."""
    if kl == "fkl_then_rkl":
        return "fkl" if step < switch_step else "rkl"
    return kl


def akl_head_mask(teacher_probs: torch.Tensor, head_mass: float = AKL_HEAD_MASS) -> torch.Tensor:
    """[N, V] bool: the AKL head, the teacher's most likely tokens (descending order) whose running
    probability sum, the token's own included, stays at or below `head_mass`; the token whose sum
    first exceeds it is in the tail, except the top-1 token, which is always head (the authors'
    `AKL.py`: tail = `cum_sum > mu`, `tail[..., 0] = False`)."""
    sorted_probs, order = teacher_probs.sort(dim=-1, descending=True)
    head_sorted = sorted_probs.cumsum(-1) <= head_mass
    head_sorted[..., 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl"):
    """Per position over the full vocabulary ([N, V] logits -> [N] each): (D, fkl, rkl) with D the
    trained divergence (`fkl` = KL(pi_T||pi_S), `rkl` = KL(pi_S||pi_T), `akl` = c_head fkl + c_tail rkl
    with sg coefficients); fkl and rkl are returned detached, for logging."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float().detach(), dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    fkl = (p_t * (log_t - log_s)).sum(-1)
    rkl = (p_s * (log_s - log_t)).sum(-1)
    if kind == "fkl":
        d = fkl
    elif kind == "rkl":
        d = rkl
    elif kind == "akl":
        with torch.no_grad():
            gap = (p_t - p_s).abs()
            head = akl_head_mask(p_t)
            g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
            total = g_head + g_tail
            c_head = torch.where(total > 0, g_head / total.clamp_min(1e-30), torch.full_like(total, 0.5))
        d = c_head * fkl + (1 - c_head) * rkl
    else:
        raise ValueError(f"unknown divergence {kind!r}")
    return d, fkl.detach(), rkl.detach()


def gradient_snr(per_problem_grads: torch.Tensor) -> float:
    """Cross-problem gradient SNR [paper]: ||mean_i g_i|| / sqrt(mean_i ||g_i - mean g||^2) for
    [n, P] flattened per-problem gradients; NaN for fewer than 2 problems, inf for identical ones."""
    g = per_problem_grads.double()
    if g.shape[0] < 2:
        return math.nan
    mean = g.mean(0)
    rms = (g - mean).pow(2).sum(1).mean().sqrt()
    signal = mean.norm()
    return float(signal / rms) if rms > 0 else math.inf


def tis_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling between the sampler (vLLM: another kernel, bf16) and the trainer
    [TRL `vllm_importance_sampling_correction`, mode token_truncate; verl rollout correction]:
    w_t = min(exp(log pi_train(y_t) - log pi_sampler(y_t)), cap), no gradient; 1 where masked.
    Here it weights each token's divergence D_t on the student's own rollouts (--mode self)."""
    w = torch.exp(train_logprobs.detach() - sampler_logprobs).clamp(max=cap)
    return torch.where(mask, w, torch.ones_like(w))


def pass_rate_bin(p: float) -> int:
    """Index into BINS: p = 0, (0, .25], (.25, .5], (.5, .75], (.75, 1), p = 1."""
    if p <= 0:
        return 0
    if p >= 1:
        return 5
    return 1 + min(3, math.ceil(p * 4) - 1)


def pass_rate_histogram(pass_rates) -> dict:
    """Share of problems in each of BINS (keys `pass_hist/<bin>`)."""
    counts = [0] * len(BINS)
    for p in pass_rates:
        counts[pass_rate_bin(float(p))] += 1
    n = max(1, len(pass_rates))
    return {f"pass_hist/{name}": c / n for name, c in zip(BINS, counts)}


# ---------------------------------------------------------------------------------------------
# Scoring: the teacher's no-grad forward, then the student's, then the chunked divergence
# ---------------------------------------------------------------------------------------------


def score(model, teacher, student_prompts, teacher_prompts, responses, pad_id, kind, chunk_size):
    """(D, fkl, rkl, mask), each [B, R], for `responses` under the student (its prompts, with
    gradient) and the teacher (its prompts, no gradient); teacher is `model` itself in self mode."""
    with torch.no_grad():
        teacher_hidden, _, _ = response_hidden(teacher, teacher_prompts, responses, pad_id)
        teacher_head = output_head(teacher)
    student_hidden, _, mask = response_hidden(model, student_prompts, responses, pad_id)
    student_head = output_head(model)

    def fn(h_student, h_teacher):
        with torch.no_grad():
            teacher_logits = teacher_head(h_teacher)
        return divergences(student_head(h_student), teacher_logits, kind)

    values = chunked_map(fn, [student_hidden[mask], teacher_hidden[mask].detach()], chunk_size)
    shaped = []
    for v in values:
        out = torch.zeros(mask.shape, dtype=v.dtype, device=v.device)
        shaped.append(out.masked_scatter(mask, v))
    return (*shaped, mask)


def snr_floor(n: float) -> float:
    """1/sqrt(n-1): what `gradient_snr` gives for n independent zero-mean gradients of one variance
    s^2 (||mean||^2 ~ s^2/n, mean squared deviation ~ s^2 (n-1)/n), the estimator's small-sample
    floor; NaN for n < 2."""
    return 1 / math.sqrt(n - 1) if n >= 2 else math.nan


def draw_snr(records: list[dict], png: Path):
    """Top: the SNR per pass-rate bin (a thin line per logged step, their mean in black) against
    the pure-noise floor 1/sqrt(n-1) (dashed, the mean over the same steps); bottom: the number
    of problems n per bin (mean over the logged steps), so sparse bins read as such. Returns the
    matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(values):
        values = [v for v in values if math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    x = list(range(len(BINS)))
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6.5, 5.5), sharex=True,
                                         gridspec_kw={"height_ratios": [3, 1.2]})
    for record in records:
        snr = [record.get(f"snr/{name}", math.nan) for name in BINS]
        top.plot(x, snr, marker="o", markersize=3, linewidth=0.8, alpha=0.45,
                 label=f"step {record['step']}")
    snr = [mean([r.get(f"snr/{name}", math.nan) for r in records]) for name in BINS]
    # the floor of each step where that step has an SNR, so both means cover the same steps
    floor = [mean([snr_floor(r.get(f"snr_n/{name}", 0)) for r in records
                   if math.isfinite(r.get(f"snr/{name}", math.nan))]) for name in BINS]
    counts = [mean([r.get(f"snr_n/{name}", math.nan) for r in records]) for name in BINS]
    top.plot(x, snr, color="black", marker="o", linewidth=2, label="SNR, mean over steps", zorder=3)
    top.plot(x, floor, color="tab:red", linestyle="--", marker="x", linewidth=2, zorder=4,
             label="pure-noise floor 1/sqrt(n-1), mean")
    top.set(ylabel="cross-problem gradient SNR", ylim=(0, None),
            title="gradient SNR per pass-rate bin, against the pure-noise floor")
    top.legend(fontsize=7, ncol=2)
    bars = bottom.bar(x, [c if math.isfinite(c) else 0 for c in counts], color="tab:gray")
    have = [sum(math.isfinite(r.get(f"snr/{name}", math.nan)) for r in records) for name in BINS]
    labels = [f"{c:.1f}" + (f"\nSNR at {k}/{len(records)}" if k < len(records) else "")
              if math.isfinite(c) else "-" for c, k in zip(counts, have)]
    bottom.bar_label(bars, labels=labels, fontsize=7)
    bottom.set(ylabel="problems n\n(mean)", xlabel="student pass rate p (bin)",
               ylim=(0, max([c for c in counts if math.isfinite(c)], default=1) * 1.5))
    bottom.set_xticks(x, BIN_LABELS)
    figure.tight_layout()
    figure.savefig(png, dpi=110)
    plt.close(figure)
    return figure


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
    if args.log_snr and world > 1:
        raise UserError("--log_snr needs per-problem gradients of unsharded weights: run it on 1 rank "
                        "(plain python), or pass --log_snr 0.")
    distill = args.mode == "distill"
    if distill and args.tis_cap > 0:
        raise UserError("--tis_cap corrects the student's own rollouts (--mode self); in --mode distill the student "
                        "trains on the teacher's references, which the teacher samples with the HF engine.")
    run = prepare_run_dir(args, f"paced_{args.mode}_{Path(args.model).name}_s{args.seed}", dist_info)
    run_dir, run_name = run.path, run.path.name
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # ---- data, tokenizers (the teacher's must be the student's: checked before any weights load) ----
    tokenizer = load_tokenizer(args.model)
    if distill and not args.eval_only:
        check_same_tokenizer(tokenizer, load_tokenizer(args.teacher_model, "--teacher_model"), args.model,
                             args.teacher_model)
    train_rows, eval_rows = load_run_problems(args, tokenizer) if not args.eval_only else ([], [])
    benchmarks = load_eval_benchmarks(args, tokenizer) if args.eval_only else []  # (name, rows) each

    # ---- student, teacher (distill: frozen, sharded like the student; self: the student itself) ----
    model = load_model(str(run.checkpoint or args.model), dist_info,
                       activation_checkpointing=args.activation_checkpointing)
    teacher = (load_model(args.teacher_model, dist_info, trainable=False, flag="--teacher_model")
               if distill and not args.eval_only else model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    engine = make_engine(args.rollout, model, tokenizer, args.gen_batch_size, args.gen_batch_tokens,
                         dist_info=dist_info, model_path=str(run.checkpoint or resolve_model(args.model)),
                         vllm_options=vllm_options(args))
    # the separate teacher (distill) samples its references with the HF engine on its own frozen weights: no
    # second vLLM engine to hold in memory or keep in sync (README, "vLLM rollouts")
    teacher_engine = (make_engine("hf", teacher, tokenizer, args.gen_batch_size, args.gen_batch_tokens)
                      if distill else None)
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
    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    eval_params = SamplingParams(args.eval_temperature, args.eval_top_p, args.eval_top_k, args.max_new_tokens)
    pad_id = tokenizer.pad_token_id
    picture, snr_records = [], []

    def run_eval(step: int) -> dict:
        metrics = evaluate(engine, tokenizer, eval_rows, grader_for(eval_rows, grader), eval_params, eval_k, dist_info,
                           args.enable_thinking,
                           own_rng=off_eval_schedule(step, args.eval_every))
        logger.log(step, metrics, prefix="eval")
        draw_picture()
        return metrics

    def draw_picture():
        if picture and dist_info.is_main:
            note = (f"D_t = the trained divergence (--kl {args.kl}) at each trained token, in "
                    f"nats (never negative); each row is {ROWS[args.mode]}, marked red if its "
                    "answer is wrong; the row label gives the problem's pass rate p and normalised "
                    "weight w~; hover: fkl, rkl.")
            write_token_picture(run_dir / "tokens.html", picture, "D_t", D_SCALE,
                                title=f"{run_name}: divergence per token", note=note)

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

    per_rank = args.num_problems // world
    print0(f"[paced] {run_name}: --mode {args.mode}, {args.num_steps} steps x {args.num_problems} problems x k "
           f"{args.k} on {world} rank(s), --weighting {args.weighting} (alpha {args.alpha}, beta {args.beta}), "
           f"--kl {args.kl}, teacher {args.teacher_model if distill else 'the student + expert solution'}")
    train_started = time.time()
    stop = GracefulStop()  # SIGINT/SIGTERM from here: end after the current step, checkpointed
    end_step = args.num_steps  # the step reached: earlier after a SIGINT/SIGTERM stop
    for step in range(start_step, args.num_steps):
        step_started = time.time()
        kind = active_divergence(args.kl, step, args.switch_step)

        # ---- 1. k student rollouts per problem -> pass rates (this step's weights)
        indices = sampler.next(args.num_problems)[rank * per_rank:(rank + 1) * per_rank]
        problems = [train_rows[i] for i in indices]
        prompts = [build_prompt(tokenizer, p["problem"], enable_thinking=args.enable_thinking) for p in problems]
        rollout_prompts = [q for q in prompts for _ in range(args.k)]
        if args.tis_cap > 0:  # the sampler's own log-probs, for the sampler/trainer correction
            responses, sampler_logprobs = engine.generate(rollout_prompts, params, desc="rollout", logprobs=True)
        else:
            responses = engine.generate(rollout_prompts, params, desc="rollout")
        texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
        rewards, grade_counts = grader.grade(texts, [p["answer"] for p in problems for _ in range(args.k)])
        pass_rates = torch.tensor([sum(rewards[i * args.k:(i + 1) * args.k]) / args.k for i in range(per_rank)],
                                  dtype=torch.float64)

        # ---- 2. weights, normalised by the global batch mean; zero-weight problems are dropped here
        raw = problem_weights(pass_rates, args.weighting, args.alpha, args.beta)
        weight_sum = float(all_reduce_sum(raw.sum()))
        weights = normalise_weights(raw, weight_sum, args.num_problems)
        trained = [i for i in range(per_rank) if weights[i] > 0]

        # ---- 3. the sequences to train on: the teacher's reference (distill) or the student's rollouts (self)
        if distill:
            count = int(all_gather_cat(torch.tensor([len(trained)])).max())  # every rank samples alike (FSDP)
            asked = [prompts[i] for i in trained] + [prompts[0]] * (count - len(trained))
            references = teacher_engine.generate(asked, params, desc="teacher") if count else []
            items = [(i, prompts[i], prompts[i], references[j]) for j, i in enumerate(trained)]
        else:
            contexts = {i: build_prompt(tokenizer, problems[i]["problem"],
                                        TOY_CONTEXT_HEADER + (problems[i]["solution"] or
                                                              f"\\boxed{{{problems[i]['answer']}}}"),
                                        args.enable_thinking) for i in trained}
            items = [(i, prompts[i], contexts[i], responses[i * args.k + j]) for i in trained for j in range(args.k)]
            item_rollouts = [i * args.k + j for i in trained for j in range(args.k)]  # the rollout of each item
        problem_tokens = {}
        for i, _, _, response in items:
            problem_tokens[i] = problem_tokens.get(i, 0) + len(response)

        # ---- 4. weighted mean over problems of the per-problem token-mean divergence
        model.train()
        sums = dict.fromkeys(["loss", "d", "fkl", "rkl", "tokens", "tis"], 0.0)
        shown, problem_d = [], {}  # problem_d: sum of D_t per problem (for L_i, logged)
        batches = micro_batches(range(len(items)), [len(items[j][1]) + len(items[j][3]) for j in range(len(items))],
                                args.micro_batch_size, args.micro_batch_tokens)
        padded = int(all_gather_cat(torch.tensor([len(batches)])).max()) if world > 1 else len(batches)
        for b in range(padded):
            batch = batches[b] if b < len(batches) else None
            dummy = batch is None or not items
            if dummy:  # FSDP: every rank runs as many forwards; this one contributes 0
                batch_items = [(0, prompts[0], prompts[0], responses[0])]
            else:
                batch_items = [items[j] for j in batch]
            d, fkl, rkl, mask = score(model, teacher, [it[1] for it in batch_items], [it[2] for it in batch_items],
                                      [it[3] for it in batch_items], pad_id, kind, args.logprob_chunk_size)
            loss_d = d
            if args.tis_cap > 0:  # trainer log-probs of the sampled tokens (the weights that sampled them)
                with torch.no_grad():
                    train_logprobs, _, _ = response_logprobs(model, [it[1] for it in batch_items],
                                                             [it[3] for it in batch_items], pad_id,
                                                             args.logprob_chunk_size)
                rows = [sampler_logprobs[item_rollouts[j]] for j in batch] if not dummy else [[]]
                tis = tis_weights(train_logprobs, padded_rows(rows, mask), mask, args.tis_cap)
                loss_d = d * tis
                sums["tis"] += 0.0 if dummy else tis[mask].sum()
            coef = torch.tensor([0.0 if dummy else float(weights[it[0]]) / max(1, problem_tokens[it[0]])
                                 for it in batch_items], dtype=d.dtype, device=d.device)
            loss = (loss_d * coef[:, None]).sum() / args.num_problems
            (loss * world).backward()  # FSDP averages gradients over ranks; the loss wants their sum
            if dummy:
                continue
            sums["loss"] += loss.detach()
            sums["d"] += d.detach()[mask].sum()
            sums["fkl"] += fkl[mask].sum()
            sums["rkl"] += rkl[mask].sum()
            sums["tokens"] += mask.sum()
            for row, it in enumerate(batch_items):
                problem_d[it[0]] = problem_d.get(it[0], 0.0) + float(d.detach()[row][mask[row]].sum())
                if rank == 0 and len(shown) < args.picture_rollouts:
                    shown.append((it, d.detach()[row][mask[row]].cpu(), fkl[row][mask[row]].cpu(),
                                  rkl[row][mask[row]].cpu()))
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.update_weights(model)

        # ---- 5. metrics, SNR, token picture, evaluation, checkpoint
        picture = picture_rows(tokenizer, grader, problems, shown, pass_rates, weights, step + 1,
                               args.mode)
        all_rates = all_gather_cat(pass_rates).tolist()
        raw_all = problem_weights(torch.tensor(all_rates), args.weighting, args.alpha, args.beta)
        sums.update(reward=sum(rewards), sequences=len(rewards), careful=sum(writes_work(t) for t in texts),
                    no_answer=grade_counts["no_answer"], grader_timeouts=grade_counts["timeout"],
                    trained_sequences=len(items), problems_scored=len(problem_d),
                    problem_kl=sum(v / max(1, problem_tokens[i]) for i, v in problem_d.items()),
                    weighted_kl=sum(float(raw[i]) * v / max(1, problem_tokens[i]) for i, v in problem_d.items()),
                    raw_weight=float(raw[list(problem_d)].sum()) if problem_d else 0.0)
        totals = all_reduce_sum(sums)
        tokens = max(totals["tokens"], 1)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        step_seconds = time.time() - step_started
        metrics = {
            "reward": totals["reward"] / totals["sequences"],
            **pass_rate_histogram(all_rates),
            "problems_trained": int((raw_all > 0).sum()),
            "effective_problems": float(raw_all.sum() ** 2 / raw_all.pow(2).sum()) if raw_all.sum() > 0 else 0.0,
            "weight_mean": float(raw_all.mean()),
            "loss": totals["loss"],
            "kl_trained": totals["d"] / tokens,
            "kl_problem_mean": totals["problem_kl"] / max(1, totals["problems_scored"]),
            # sum_i w_i L_i / sum_i w_i with the raw weights, all-reduced: what `loss` must equal
            "kl_weighted_mean": totals["weighted_kl"] / totals["raw_weight"] if totals["raw_weight"] > 0 else 0.0,
            "kl_fkl": totals["fkl"] / tokens,
            "tis_weight_mean": (totals["tis"] / totals["tokens"] if args.tis_cap > 0 and totals["tokens"]
                                else float("nan")),
            "kl_rkl": totals["rkl"] / tokens,
            "kl_active_rkl": float(kind == "rkl"),
            "kl_active_akl": float(kind == "akl"),
            "trained_tokens": totals["tokens"],
            "trained_sequences": totals["trained_sequences"],
            "grad_norm": float(grad_norm),
            "careful_frac": totals["careful"] / totals["sequences"],
            "no_answer": totals["no_answer"],
            "grader_timeouts": totals["grader_timeouts"],
            "step_seconds": step_seconds,
        }
        if args.log_snr and (step + 1) % args.log_snr == 0:
            snr, sizes = snr_by_bin(model, teacher, teacher_engine, tokenizer, problems, prompts,
                                    responses, pass_rates, args, kind, params)
            logged = {**{f"snr/{name}": v for name, v in snr.items()},
                      **{f"snr_n/{name}": n for name, n in sizes.items()}}
            metrics.update(logged)
            snr_records.append({"step": step + 1, **logged})
            if dist_info.is_main:
                draw_snr(snr_records, run_dir / "snr.png")
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

    draw_picture()
    minutes = (time.time() - train_started) / 60
    ended = "done" if end_step == args.num_steps else "stopped"
    summary = f"[paced] {ended}: steps {start_step}->{end_step} in {minutes:.1f} min; runs dir {run_dir}"
    if "first" in history and "last" in history:
        key = f"eval/avg@{eval_k}"
        summary += f"; {key} {history['first'][key]:.3f} -> {history['last'][key]:.3f}"
    print0(summary)
    print0(f"[paced] evaluate its final weights: {eval_command(args, run_dir)}")
    logger.close()
    grader.close()
    return history


def picture_rows(tokenizer, grader, problems, shown, pass_rates, weights, step, mode) -> list[dict]:
    """tokens.html rows for the `shown` sequences ((item, D_t, fkl, rkl) each), graded so that a
    wrong answer is marked: in distill mode the teacher's references are not checked otherwise."""
    texts = tokenizer.batch_decode([item[3] for item, *_ in shown], skip_special_tokens=True)
    right = grader.grade(texts, [problems[item[0]]["answer"] for item, *_ in shown])[0]
    return [picture_row(tokenizer, problems[item[0]], item[3], float(pass_rates[item[0]]),
                        float(weights[item[0]]), d, fkl, rkl, step, ok > 0, mode)
            for (item, d, fkl, rkl), ok in zip(shown, right)]


def picture_row(tokenizer, problem, response, p, w, d, fkl, rkl, step, correct, mode) -> dict:
    """One row of tokens.html: the trained sequence coloured by D_t, with p and w~ on the row and
    a mark when its answer is wrong (in distill mode a wrong reference still trains)."""
    text, spans = response_token_spans(tokenizer, response)
    return {"tokens": [text[s:e] for s, e in spans], "values": d.tolist(),
            "hover": [f"fkl={f:.3f} rkl={r:.3f}" for f, r in zip(fkl.tolist(), rkl.tolist())],
            "label": f"step {step} | p {p:.3f} | w~ {w:.3f}\n{problem['problem']}",
            "mark": "" if correct else f"wrong answer ({ROWS[mode]})"}


def snr_by_bin(model, teacher, teacher_engine, tokenizer, problems, prompts, responses, pass_rates, args, kind,
               params) -> tuple[dict, dict]:
    """Per pass-rate bin: gradient_snr of the flattened per-problem gradients of the unweighted
    per-problem loss L_i, for every problem of this step (also p in {0, 1}; in distill mode the teacher
    samples their references here, a diagnostic cost), with the weights after this step's update;
    and the number of problems n in each bin (a bin's SNR is read against `snr_floor(n)`)."""
    params_list = [p for p in model.parameters() if p.requires_grad]
    if args.mode == "distill":
        references = teacher_engine.generate(prompts, params, desc="snr teacher")
    by_bin = {name: [] for name in BINS}
    for i, problem in enumerate(problems):
        if args.mode == "distill":
            student_prompts, teacher_prompts, seqs = [prompts[i]], [prompts[i]], [references[i]]
        else:
            context = build_prompt(tokenizer, problem["problem"], TOY_CONTEXT_HEADER + (problem["solution"] or
                                   f"\\boxed{{{problem['answer']}}}"), args.enable_thinking)
            seqs = responses[i * args.k:(i + 1) * args.k]
            student_prompts, teacher_prompts = [prompts[i]] * len(seqs), [context] * len(seqs)
        d, _, _, mask = score(model, teacher, student_prompts, teacher_prompts, seqs, tokenizer.pad_token_id, kind,
                              args.logprob_chunk_size)
        if not mask.any():
            continue
        loss = d[mask].mean()
        grads = torch.autograd.grad(loss, params_list, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, params_list)])
        by_bin[BINS[pass_rate_bin(float(pass_rates[i]))]].append(flat)
    snr = {name: gradient_snr(torch.stack(g)) if len(g) >= 2 else math.nan
           for name, g in by_bin.items()}
    return snr, {name: len(g) for name, g in by_bin.items()}


if __name__ == "__main__":
    run_main(main)
