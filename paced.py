"""PACED: pass-rate-weighted distillation and self-distillation (arXiv 2603.11178).

Idea. Distillation spends most of its gradient on problems the student always or never solves: the
cross-problem gradient signal-to-noise ratio is bell-shaped over the student's pass rate p and
collapses at p = 0 and 1 [paper]. PACED weights each problem's distillation loss by a Beta kernel
of p, so training concentrates on the frontier of competence. The teacher is a larger frozen model
whose sampled reference the student is teacher-forced on (distill), or the student shown the
expert solution, scoring the student's own rollouts (self).

Equations (per problem x_i of the global batch of N problems; sg = stop-gradient):
    p_i  = (1/K) sum_k R(x_i, y_ik)     pass rate of K student rollouts (this step's weights)
    w_i  = p_i^alpha (1 - p_i)^beta     --weighting beta (p in {0,1} -> 0: no teacher work);
           hard: 1 if 0 < p_i < 1 else 0; none: 1;   w~_i = w_i / mean(w) over the global batch
    D_t  = fkl KL(pi_T||pi_S) | rkl KL(pi_S||pi_T) | fkl_then_rkl (fkl for --switch_step steps)
           | akl c_head fkl + c_tail rkl, each over the full vocabulary
    L_i  = mean of D_t over problem i's trained tokens (distill: the teacher's reference; self:
           all K rollouts);   L = (1/N) sum_i w~_i L_i = sum_i w_i L_i / sum_i w_i
AKL (Wu et al. 2024, a baseline): head = the teacher's likeliest tokens whose running probability
(own included) stays <= 0.5, the top-1 always [code: the authors' AKL.py]; g_head, g_tail = sum
|p_T - p_S| over each part; c_head = sg[g_head / (g_head + g_tail)] (0.5 when both are 0) [ours].
Sources: [paper] w(p), alpha = beta = 1, p from K rollouts, both settings, fkl for distillation,
the fkl -> rkl schedule, the AKL and unweighted baselines, the SNR diagnostic (||mean per-problem
gradient|| / RMS deviation, per pass-rate bin); [ours] K = 8, dividing by the batch mean, the hard
filter's weight 1, --switch_step 30, the bins, the toy defaults (16 problems x 8, lr 2e-4).
Simplifications, each safe: --temperature shapes sampling only, D_t compares the two models' full
distributions at T = 1 (the teacher's is the target; no sampled token's log-prob enters the loss)
[ours; TRL's GKD tempers both]; the teacher samples with the HF engine (frozen: nothing to sync).

    python paced.py                             # distill toy <- toy-large, PACED weights, CPU
    python paced.py --mode self                 # self-distillation (teacher = student + solution)
    python paced.py --kl akl --weighting none   # AKL; --weighting hard; --kl fkl_then_rkl
    python paced.py --log_snr 10                # SNR per pass-rate bin every 10 steps (1 rank)
    torchrun --nproc_per_node 2 paced.py --num_steps 3  # two CPU ranks (gloo, FSDP2)
Paper (distillation, Qwen3-1.7B from Qwen3-8B, one 8-GPU node; teacher, data, steps, lr [ours];
then its avg@8 on MATH-500, AIME 2024 and AIME 2025 [paper]):
    torchrun --nproc_per_node 8 paced.py --mode distill --model Qwen/Qwen3-1.7B \\
        --teacher_model Qwen/Qwen3-8B --dataset dapo --eval_dataset math500 --k 8 --num_steps 200 \\
        --num_problems 64 --lr 1e-6 --max_new_tokens 8192 --temperature 0.7 --top_p 0.95 \\
        --micro_batch_size 4 --activation_checkpointing --eval_every 20 --save_every 20
    python paced.py --eval_only --resume --run_name <run> --eval_dataset math500,aime24,aime25
"""

import collections
import math
from dataclasses import dataclass
from typing import Literal

import torch

import common
from common import option

EVAL_PROTOCOL = {"math500": 8, "aime24": 8, "aime25": 8}  # avg@8 on MATH-500, AIME 24/25 [paper]
STEP_LINE = ("reward", "loss", "weight_mean", "kl_trained", "step_seconds")  # all: metrics.jsonl
# pass-rate bins of the histogram and the SNR [ours]: p = 0, (0, .25], ..., (.75, 1), p = 1
BINS = ["p0", "p0-25", "p25-50", "p50-75", "p75-100", "p1"]
BIN_LABELS = ["p = 0", "(0, .25]", "(.25, .5]", "(.5, .75]", "(.75, 1)", "p = 1"]  # snr.png's axis
D_SCALE = (0.0, 1.0)  # tokens.html: D_t >= 0 in nats, white at 0, saturated at 1 [ours]
ROWS = {"distill": "the teacher's reference", "self": "the student's rollout"}  # tokens.html rows


@dataclass
class Args(common.RunOptions):
    mode: Literal["distill", "self"] = option(
        "distill", "distill: frozen --teacher_model samples a reference, teacher-forced KL on it; "
        "self: the student shown the expert solution scores the student's rollouts [paper]")
    teacher_model: str = option("toy-large", "distill's frozen teacher, same tokenizer as --model")
    k: int = option(8, "student rollouts per problem for the pass rate [paper: K; ours: 8]")
    alpha: float = option(1.0, "w(p) = p^alpha (1-p)^beta [paper: 1]")
    beta: float = option(1.0, "w(p) = p^alpha (1-p)^beta [paper: 1]")
    weighting: Literal["beta", "none", "hard"] = option(
        "beta", "beta = PACED, none = unweighted, hard = weight 1 for 0 < p < 1 [paper baselines]")
    kl: Literal["fkl", "rkl", "fkl_then_rkl", "akl"] = option("fkl", "divergence [paper]")
    switch_step: int = option(30, "fkl_then_rkl: fkl for the first N steps, then rkl [ours: 30]")
    log_snr: int = option(0, "every N steps, the gradient SNR per pass-rate bin (1 rank); 0 = off")
    # shared options whose toy defaults differ here [ours]
    num_problems: int = option(16, "problems per step, global [ours: 16 on the toy]")
    lr: float = option(2e-4, "AdamW learning rate [ours: 2e-4 for the tiny toy model]")


RULES = {"k": common.at_least(1), **{name: common.at_least(0) for name in (  # shared: ARG_RULES
    "alpha", "beta", "switch_step", "log_snr", "picture_rollouts")}}


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions
# ---------------------------------------------------------------------------------------------


def beta_weight(p: torch.Tensor, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """w(p) = p^alpha (1-p)^beta [paper], and 0 at p in {0, 1} for every alpha, beta (also alpha
    or beta = 0, where 0^0 would give 1): problems solved always or never are skipped."""
    p = torch.as_tensor(p, dtype=torch.float64)
    w = p.pow(alpha) * (1 - p).pow(beta)
    return torch.where((p > 0) & (p < 1), w, torch.zeros_like(w))


def problem_weights(p: torch.Tensor, weighting: str = "beta", alpha: float = 1.0,
                    beta: float = 1.0) -> torch.Tensor:
    """Raw per-problem weights: `beta` = w(p); `hard` = 1 for 0 < p < 1, else 0; `none` = 1."""
    p = torch.as_tensor(p, dtype=torch.float64)
    if weighting == "none":
        return torch.ones_like(p)
    if weighting == "hard":
        return ((p > 0) & (p < 1)).to(p.dtype)
    return beta_weight(p, alpha, beta)


def normalise_weights(w: torch.Tensor, batch_sum: float | None = None,
                      batch_count: int | None = None) -> torch.Tensor:
    """w / mean(w) over the (global) batch: `batch_sum`/`batch_count` are the all-reduced sum and
    count (default: this tensor's). A batch whose weights are all 0 stays all 0."""
    total = float(w.sum()) if batch_sum is None else batch_sum
    count = len(w) if batch_count is None else batch_count
    return w * (count / total) if total > 0 else torch.zeros_like(w)


def active_divergence(kl: str, step: int, switch_step: int) -> str:
    """The divergence of step `step` (0-based): fkl_then_rkl is fkl for steps < switch_step."""
    return ("fkl" if step < switch_step else "rkl") if kl == "fkl_then_rkl" else kl


def akl_head_mask(teacher_probs: torch.Tensor, head_mass: float = 0.5) -> torch.Tensor:
    """[N, V] bool: the AKL head, the teacher's likeliest tokens whose running probability sum
    (own included) stays <= `head_mass` (0.5 [Wu et al. 2024]), the top-1 always; the crossing
    token starts the tail (the authors' `AKL.py`: tail = `cum_sum > mu`, `tail[..., 0] = False`)."""
    sorted_probs, order = teacher_probs.sort(dim=-1, descending=True)
    head_sorted = sorted_probs.cumsum(-1) <= head_mass
    head_sorted[..., 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def divergences(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl"):
    """Per position over the full vocabulary ([N, V] logits -> [N] each): (D, fkl, rkl), D the
    trained divergence (`fkl` = KL(pi_T||pi_S), `rkl` = KL(pi_S||pi_T), `akl` = c_head fkl +
    c_tail rkl with sg coefficients); fkl and rkl are returned detached, for logging."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    log_t = torch.log_softmax(teacher_logits.float().detach(), dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    fkl = (p_t * (log_t - log_s)).sum(-1)
    rkl = (p_s * (log_s - log_t)).sum(-1)
    if kind != "akl":
        return {"fkl": fkl, "rkl": rkl}[kind], fkl.detach(), rkl.detach()
    with torch.no_grad():
        gap, head = (p_t - p_s).abs(), akl_head_mask(p_t)
        g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
        total = g_head + g_tail
        c_head = torch.where(total > 0, g_head / total.clamp_min(1e-30),
                             torch.full_like(total, 0.5))
    return c_head * fkl + (1 - c_head) * rkl, fkl.detach(), rkl.detach()


def gradient_snr(per_problem_grads: torch.Tensor) -> float:
    """Cross-problem gradient SNR [paper]: ||mean_i g_i|| / sqrt(mean_i ||g_i - mean g||^2) of
    [n, P] flattened per-problem gradients; NaN for n < 2, inf for identical ones."""
    g = per_problem_grads.double()
    if g.shape[0] < 2:
        return math.nan
    mean = g.mean(0)
    rms = (g - mean).pow(2).sum(1).mean().sqrt()
    return float(mean.norm() / rms) if rms > 0 else math.inf


def snr_floor(n: float) -> float:
    """1/sqrt(n-1), the small-sample floor: `gradient_snr` of n independent zero-mean gradients of
    variance s^2 (||mean||^2 ~ s^2/n, mean squared deviation ~ s^2 (n-1)/n); NaN for n < 2."""
    return 1 / math.sqrt(n - 1) if n >= 2 else math.nan


def pass_rate_bin(p: float) -> int:
    """Index into BINS: p = 0, (0, .25], (.25, .5], (.5, .75], (.75, 1), p = 1."""
    return 0 if p <= 0 else 5 if p >= 1 else min(4, math.ceil(p * 4))


def pass_rate_histogram(pass_rates) -> dict:
    """Share of problems in each of BINS (keys `pass_hist/<bin>`)."""
    counts = collections.Counter(pass_rate_bin(float(p)) for p in pass_rates)
    return {f"pass_hist/{name}": counts[b] / max(1, len(pass_rates)) for b, name in enumerate(BINS)}


def score(model, teacher, student_prompts, teacher_prompts, responses, pad_id, kind, chunk_size):
    """(D, fkl, rkl, mask), each [B, R], for `responses` under the student (its prompts, with
    gradient) and the teacher (its prompts, no gradient); teacher is `model` itself in self mode."""
    with torch.no_grad():
        teacher_hidden, _, _ = common.response_hidden(teacher, teacher_prompts, responses, pad_id)
        teacher_head = common.output_head(teacher)
    student_hidden, _, mask = common.response_hidden(model, student_prompts, responses, pad_id)
    student_head = common.output_head(model)

    def fn(h_student, h_teacher):
        with torch.no_grad():
            teacher_logits = teacher_head(h_teacher)
        return divergences(student_head(h_student), teacher_logits, kind)

    return (*common.chunked_map(fn, [student_hidden, teacher_hidden], chunk_size, mask), mask)


def context_prompt(tokenizer, problem: dict, enable_thinking) -> list[int]:
    """The self-teacher's prompt: the problem with the expert solution (else the boxed answer)."""
    solution = problem["solution"] or f"\\boxed{{{problem['answer']}}}"
    return common.build_prompt(tokenizer, problem["problem"],
                               common.TOY_CONTEXT_HEADER + solution, enable_thinking)


def snr_by_bin(run, teacher, teacher_engine, batch, pass_rates, kind) -> tuple[dict, dict]:
    """Per pass-rate bin: `gradient_snr` of the per-problem gradients of the unweighted L_i, for
    every problem of the step (also p in {0, 1}: distill samples their references here, a
    diagnostic cost) after this step's update; and n, the problems per bin (see `snr_floor`)."""
    args, model, k, prompts = run.args, run.model, run.args.k, batch.prompts[::run.args.k]
    weights = [p for p in model.parameters() if p.requires_grad]
    if args.mode == "distill":
        references = teacher_engine.generate(prompts, run.rollout_params, desc="snr teacher")
    by_bin = {name: [] for name in BINS}
    for i, problem in enumerate(batch.problems):
        if args.mode == "distill":
            sequences, teacher_prompt = [references[i]], prompts[i]
        else:
            sequences = batch.responses[i * k:(i + 1) * k]
            teacher_prompt = context_prompt(run.tokenizer, problem, args.enable_thinking)
        d, _, _, mask = score(model, teacher, [prompts[i]] * len(sequences),
                              [teacher_prompt] * len(sequences), sequences,
                              run.tokenizer.pad_token_id, kind, args.logprob_chunk_size)
        if not mask.any():
            continue
        grads = torch.autograd.grad(d[mask].mean(), weights, allow_unused=True)
        by_bin[BINS[pass_rate_bin(float(pass_rates[i]))]].append(torch.cat(
            [(g if g is not None else torch.zeros_like(w)).reshape(-1).double()
             for g, w in zip(grads, weights)]))
    return ({name: gradient_snr(torch.stack(g)) if g else math.nan for name, g in by_bin.items()},
            {name: len(g) for name, g in by_bin.items()})


def picture(run, problems, step, shown, owner, sequences, d, fkl, rkl, mask, pass_rates,
            weights) -> dict:
    """tokens.html: the `shown` trained sequences (rows of the [N, R] `d`, `fkl`, `rkl`, `mask`;
    sequence j answers problem owner[j]) coloured by D_t, fkl and rkl on hover, the problem's p
    and w~ on the row, marked when the answer is wrong: distill trains on unchecked references."""
    tokenizer, mode = run.tokenizer, run.args.mode
    texts = tokenizer.batch_decode([sequences[j] for j in shown], skip_special_tokens=True)
    right, _ = run.grader.grade(texts, [problems[owner[j]]["answer"] for j in shown])
    rows = []
    for j, correct in zip(shown, right):
        i, valid = owner[j], mask[j]
        text, spans = common.response_token_spans(tokenizer, sequences[j])
        rows.append({"tokens": [text[a:b] for a, b in spans], "values": d[j][valid].tolist(),
                     "hover": [f"fkl={f:.3f} rkl={r:.3f}"
                               for f, r in zip(fkl[j][valid].tolist(), rkl[j][valid].tolist())],
                     "label": f"step {step} | p {float(pass_rates[i]):.3f} | "
                              f"w~ {float(weights[i]):.3f}\n{problems[i]['problem']}",
                     "mark": "" if correct > 0 else f"wrong answer ({ROWS[mode]})"})
    return dict(rows=rows, value_name="D_t", scale=D_SCALE,
                title=f"{run.dir.name}: divergence per token",
                note=f"D_t = the trained divergence (--kl {run.args.kl}) at each trained token, "
                     f"in nats (never negative); each row is {ROWS[mode]}, marked red if its "
                     "answer is wrong; the row label gives the problem's pass rate p and "
                     "normalised weight w~; hover: fkl, rkl.")


def draw_snr(records: list[dict], png):
    """Top: the SNR per pass-rate bin (a thin line per logged step, their mean in black) against
    the pure-noise floor 1/sqrt(n-1) (dashed, mean over the same steps); bottom: the problems n
    per bin (mean over the logged steps), so sparse bins read as such. Returns the figure."""
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
        top.plot(x, [record.get(f"snr/{name}", math.nan) for name in BINS], marker="o",
                 markersize=3, linewidth=0.8, alpha=0.45, label=f"step {record['step']}")
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
    args = common.parse_args(Args, argv)
    common.validate_args(args, RULES)  # every option's range before anything loads: one line
    distill = args.mode == "distill"
    if distill and args.tis_cap > 0:
        raise common.UserError("--tis_cap corrects the student's own rollouts (--mode self); in "
                               "--mode distill the student trains on the teacher's references, "
                               "which the teacher samples with the HF engine.")
    if args.log_snr and common.init_distributed(args.dist_timeout).world_size > 1:
        raise common.UserError("--log_snr needs per-problem gradients of unsharded weights: run "
                               "it on 1 rank (plain python), or pass --log_snr 0.")
    run = common.setup(args, f"paced_{args.mode}", EVAL_PROTOCOL, STEP_LINE, group=args.k,
                       teacher=args.teacher_model if distill else None)
    if args.eval_only:
        return common.eval_only(run)
    model, k, world, pad_id = run.model, args.k, run.dist.world_size, run.tokenizer.pad_token_id
    teacher = run.teacher if distill else model  # self: the live student shown the solution
    # distill: the HF engine on the teacher's frozen weights, no second vLLM engine to keep in sync
    teacher_engine = common.make_engine("hf", run.teacher, run.tokenizer, args.gen_batch_size,
                                        args.gen_batch_tokens) if distill else None
    snr_records = []
    common.print0(f"[paced] {run.dir.name}: {args.mode}, {args.weighting}, {args.kl}; "
                  f"{args.num_steps} steps x {args.num_problems} x k {k} on {world} rank(s)")
    for step in common.train_steps(run):
        # ---- 1. K student rollouts per problem -> pass rates p_i (this step's weights)
        batch = common.sample_rollouts(run, k)
        prompts = batch.prompts[::k]  # one per problem
        pass_rates = torch.tensor(batch.rewards, dtype=torch.float64).view(-1, k).mean(1)

        # ---- 2. weights w~_i, normalised by the global batch mean; zero-weight problems drop out
        raw = problem_weights(pass_rates, args.weighting, args.alpha, args.beta)
        weights = normalise_weights(raw, float(common.all_reduce_sum(raw.sum())),
                                    args.num_problems)
        trained = [i for i in range(len(prompts)) if weights[i] > 0]

        # ---- 3. the trained sequences: the teacher's reference (distill), the K rollouts (self);
        # sequence j answers problem owner[j]
        if distill:  # every rank asks the teacher alike (FSDP gathers the weights on all)
            count = int(common.all_gather_cat(torch.tensor([len(trained)])).max())
            asked = [prompts[i] for i in trained] + [prompts[0]] * (count - len(trained))
            references = teacher_engine.generate(asked, run.rollout_params, desc="teacher") \
                if count else []
            owner, sequences, rollout_of = trained, references[:len(trained)], []
        else:
            rollout_of = [i * k + j for i in trained for j in range(k)]
            owner = [r // k for r in rollout_of]
            sequences = [batch.responses[r] for r in rollout_of]
        n, problem_tokens = len(sequences), [0] * len(prompts)
        for i, sequence in zip(owner, sequences):
            problem_tokens[i] += len(sequence)
        # the teacher's prompt: the student's (distill) or with the expert solution (self)
        teacher_prompt = {i: prompts[i] if distill else
                          context_prompt(run.tokenizer, batch.problems[i], args.enable_thinking)
                          for i in trained}
        # item n (rollout 0, weight 0) pads the micro-batches: FSDP runs as many on every rank
        student_prompts = [prompts[i] for i in owner] + [prompts[0]]
        teacher_prompts = [teacher_prompt[i] for i in owner] + [prompts[0]]
        sequences, rollout_of = sequences + [batch.responses[0]], rollout_of + [0]
        coef = [float(weights[i]) / max(1, problem_tokens[i]) for i in owner] + [0.0]  # w~_i / T_i

        # ---- 4. L = (1/N) sum_i w~_i L_i: each token's D_t times w~_i / (problem i's tokens)
        model.train()
        kind = active_divergence(args.kl, step, args.switch_step)
        width = max([1] + [len(s) for s in sequences])
        d_all, fkl_all, rkl_all, tis_all = torch.zeros(4, n + 1, width, device=run.dist.device)
        mask_all = torch.zeros(n + 1, width, dtype=torch.bool, device=run.dist.device)
        lengths = [len(p) + len(s) for p, s in zip(student_prompts, sequences)]
        batches = common.micro_batches(range(n), lengths, args.micro_batch_size,
                                       args.micro_batch_tokens)
        forwards = int(common.all_gather_cat(torch.tensor([len(batches)])).max())  # same on all
        sums = {"loss": 0.0}
        for b in range(forwards):
            rows = batches[b] if b < len(batches) else [n]
            student_in, teacher_in, sequences_in = (
                [items[j] for j in rows] for items in (student_prompts, teacher_prompts, sequences))
            d, fkl, rkl, mask = score(model, teacher, student_in, teacher_in, sequences_in, pad_id,
                                      kind, args.logprob_chunk_size)
            cols, loss_d = slice(0, mask.shape[1]), d
            if args.tis_cap > 0:  # the trainer's log-probs of the sampled tokens, at T = 1
                with torch.no_grad():
                    train_logprobs, _, _ = common.response_logprobs(
                        model, student_in, sequences_in, pad_id, args.logprob_chunk_size)
                sampled = batch.sampler_logprobs[[rollout_of[j] for j in rows], cols]
                tis = common.tis_weights(train_logprobs, sampled, mask, args.tis_cap)
                loss_d = d * tis
                tis_all[rows, cols] = tis
            weight = torch.tensor([coef[j] for j in rows], dtype=d.dtype, device=d.device)
            loss = (loss_d * weight[:, None]).sum() / args.num_problems
            (loss * world).backward()  # FSDP averages gradients over ranks; we want the sum
            sums["loss"] += loss.detach()
            d_all[rows, cols], fkl_all[rows, cols], rkl_all[rows, cols] = d.detach(), fkl, rkl
            mask_all[rows, cols] = mask
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.engine.update_weights(model)

        # ---- 5. metrics (the pass-rate histogram, L_i), token picture, SNR, checkpoint
        mask_all[n] = False  # the pad item counts nowhere
        problem_d = {}  # per problem: the sum of its D_t, in loss-loop order
        for j in (j for rows in batches for j in rows):
            problem_d[owner[j]] = problem_d.get(owner[j], 0.0) + float(d_all[j][mask_all[j]].sum())
        all_rates = common.all_gather_cat(pass_rates)
        raw_all = problem_weights(all_rates, args.weighting, args.alpha, args.beta)
        sums.update(**{name: common.loop_sum(values, mask_all, batches) for name, values in
                       (("d", d_all), ("fkl", fkl_all), ("rkl", rkl_all), ("tis", tis_all))},
                    trained_tokens=mask_all.sum(), trained_sequences=n,
                    problems_scored=len(problem_d),  # L_i = problem_d[i] / T_i
                    problem_kl=sum(v / max(1, problem_tokens[i]) for i, v in problem_d.items()),
                    weighted_kl=sum(float(raw[i]) * v / max(1, problem_tokens[i])
                                    for i, v in problem_d.items()),
                    raw_weight=float(raw[list(problem_d)].sum()) if problem_d else 0.0,
                    careful=sum(common.writes_work(text) for text in batch.texts))
        totals, shared = common.step_metrics(run, batch, sums, grad_norm)
        tokens = max(totals["trained_tokens"], 1)
        metrics = {
            **{key: shared[key] for key in ("reward", "loss", "grad_norm", "no_answer",
                                            "grader_timeouts", "step_seconds")},
            **pass_rate_histogram(all_rates),
            "problems_trained": int((raw_all > 0).sum()),
            "effective_problems": float(raw_all.sum() ** 2 / raw_all.pow(2).sum())
            if raw_all.sum() > 0 else 0.0,
            "weight_mean": float(raw_all.mean()), "kl_trained": totals["d"] / tokens,
            "kl_problem_mean": totals["problem_kl"] / max(1, totals["problems_scored"]),
            # sum_i w_i L_i / sum_i w_i, all-reduced from the raw weights: what `loss` must equal
            "kl_weighted_mean": totals["weighted_kl"] / totals["raw_weight"]
            if totals["raw_weight"] > 0 else 0.0,
            "kl_fkl": totals["fkl"] / tokens, "kl_rkl": totals["rkl"] / tokens,
            "tis_weight_mean": common.ratio(totals["tis"], totals["trained_tokens"])
            if args.tis_cap > 0 else float("nan"),
            "kl_active_rkl": float(kind == "rkl"), "kl_active_akl": float(kind == "akl"),
            "trained_tokens": totals["trained_tokens"],
            "trained_sequences": totals["trained_sequences"],
            "careful_frac": totals["careful"] / totals["sequences"]}
        shown = [j for rows in batches for j in rows][:args.picture_rollouts]  # as trained
        if run.dist.is_main and shown:
            run.picture = picture(run, batch.problems, step + 1, shown, owner, sequences, d_all,
                                  fkl_all, rkl_all, mask_all, pass_rates, weights)
        if args.log_snr and (step + 1) % args.log_snr == 0:
            snr, sizes = snr_by_bin(run, teacher, teacher_engine, batch, pass_rates, kind)
            logged = {**{f"snr/{name}": value for name, value in snr.items()},
                      **{f"snr_n/{name}": size for name, size in sizes.items()}}
            metrics.update(logged)
            snr_records.append({"step": step + 1, **logged})
            if run.dist.is_main:
                draw_snr(snr_records, run.dir / "snr.png")
        if common.end_step(run, step, metrics):
            break
    return common.finish(run)


if __name__ == "__main__":
    common.run_main(main)
