"""IW-OPD: importance-weighted on-policy distillation, with standard OPD (arXiv 2606.22600,
"On the Position Bias of On-Policy Distillation").

Idea. In on-policy distillation (OPD) the student samples a response and a frozen, stronger
teacher scores each sampled token: the student is pushed up where the teacher likes its token
more. The first tokens decide where a response goes (and the models disagree most there), yet a
token-mean loss weighs them like the last. IW-OPD weights each token by the share of the
sequence's unsigned student-teacher discrepancy still ahead of it: 1 + gamma at the first token,
decaying towards 1.

Equations (sg = stop-gradient; per sequence, t = 1..T over valid response tokens):
    a_t     = log pi_T(y_t | x, y_<t) - log pi_old(y_t | x, y_<t)   sampled-token advantage
    d_t     = |a_t|                (--iw signed: d_t = a_t, the unstable variant [paper Fig. 4])
    F_{t-1} = sum_{k<t} d_k / (sum_k d_k + 1e-8)                   share of discrepancy before t
    w_t     = sg[1 + gamma * clamp(1 - F_{t-1}, 0, 1)]              (--iw none: w_t = 1, OPD)
    L       = sum_t -min(rho_t w_t a_t, clip(rho_t, 1-eps, 1+eps) w_t a_t) / N_tokens
One update per batch (--num_minibatches 1): rho_t = 1, grad L = -sum_t w_t a_t grad log pi(y_t) /
N_tokens (the paper's loss); N_tokens: valid (--token_slice: selected) response tokens, all ranks.
Sources: [paper]; [code] the authors' patched verl (the weight in `dp_actor.py`, there g_t with
w_max = 1 + gamma = 1.5, d_t from the rollout log-probs, in the standard PPO clipped loss); [ours]
where both are silent. Paper setting [paper/code]: one rollout per prompt, AdamW lr 1e-5, T 1.0,
top-p 1, PPO clip 0.2, grad-norm clip 1.0 (verl's), token-mean, no KL or entropy terms, thinking
off; students Qwen3-0.6B / Qwen3-4B from Qwen3-4B-Instruct-2507 / Qwen3-30B-A3B-Instruct-2507.
Simplifications, each safe: all log-probs (student, behaviour policy, teacher) are taken under
softmax(logits / --temperature), as verl scores its reference model [code] (moot at T = 1);
--token_slice (the paper's Figure 1a test) keeps the whole response's weights and only restricts
the loss's tokens [ours]; the toy defaults (lr 1e-4, 64 prompts, 64 tokens) fit the tiny model
only. The toy (README, "The toy testbed") builds the premise in: `toy-large` prefers the careful
strategy, decided at the third response token, so the models disagree most early on (logged
every step as gap_first_third / gap_last_third).

    python iw_opd.py                                  # IW-OPD: toy student from toy-large, CPU
    python iw_opd.py --iw none                        # standard OPD
    python iw_opd.py --iw signed                      # signed prefix sum (unstable variant)
    python iw_opd.py --iw none --token_slice first30  # OPD on the first 30% of tokens only
    python iw_opd.py --eval_only --model <ckpt> --eval_dataset aime24,aime25   # one table
    torchrun --nproc_per_node 2 iw_opd.py --num_steps 3  # two CPU ranks (gloo, FSDP2)
Paper (Qwen3-0.6B from Qwen3-4B-Instruct-2507, one 8-GPU node; data, steps, batch, lengths [ours]):
    torchrun --nproc_per_node 8 iw_opd.py --model Qwen3-0.6B \\
        --teacher_model Qwen3-4B-Instruct-2507 --dataset dapo --eval_dataset math500 \\
        --num_steps 200 --num_problems 256 --num_rollouts 1 --lr 1e-5 --max_new_tokens 8192 \\
        --micro_batch_size 8 --activation_checkpointing --eval_every 20 --save_every 20
"""

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
from common import option

EVAL_PROTOCOL: dict = {}  # the paper states no k [ours: common.DATASETS defaults]
STEP_LINE = ("reward", "loss", "w_mean", "a_mean", "step_seconds")  # stdout; all: metrics.jsonl
SLICE_SHARE = (3, 10)  # --token_slice first30 / last30 keep ceil(3n/10) of n tokens [paper: 30%]
# tokens.html scales, fixed so pictures of different steps and runs compare [ours]
A_SCALE = (-1.0, 1.0)  # a_t in nats (colour): saturated at an e-fold probability ratio
W_SCALE = (1.0, 2.0)  # w_t (underline): 1 (white; plain OPD) to 2 (black; first token at gamma 1)


@dataclass
class Args(common.RunOptions):
    teacher_model: str = option("toy-large", "frozen teacher, same tokenizer as --model [paper: "
                                             "Qwen3-4B-Instruct-2507 for Qwen3-0.6B]")
    iw: Literal["unsigned", "signed", "none"] = option(
        "unsigned", "token weight: unsigned = IW-OPD [paper], signed = signed prefix sum "
                    "[paper Fig. 4], none = OPD")
    gamma: float = option(0.5, "weight of the first token is 1 + gamma [code: w_max 1.5]")
    token_slice: Literal["all", "first30", "last30"] = option(
        "all", "train on all tokens, or only the first / last 30 percent of each response "
               "[paper Fig. 1a]")
    num_rollouts: int = option(1, "rollouts per prompt [paper: 1]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low [code]")
    clip_high: float = option(0.2, "PPO ratio clip eps_high [code]")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")
    # shared options with this paper's defaults
    num_problems: int = option(64, "prompts per step, global [ours: 64 on the toy]")
    enable_thinking: Optional[bool] = option(False, "Qwen3 chat template thinking switch "
                                                    "[code: off]")


RULES = {  # valid ranges of IW-OPD's own options; the shared ones: common.ARG_RULES
    "num_rollouts": common.at_least(1),
    "gamma": common.at_least(0),
    "picture_rollouts": common.at_least(0),
}


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions on [B, T] tensors with a boolean mask of valid tokens
# ---------------------------------------------------------------------------------------------


def sampled_token_advantage(teacher_logp: torch.Tensor, old_logp: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """a_t = log pi_T(y_t) - log pi_old(y_t) on the sampled token [code]; 0 on padding."""
    return torch.where(mask, teacher_logp - old_logp, 0.0).detach()


@torch.no_grad()
def importance_weights(a: torch.Tensor, mask: torch.Tensor, gamma: float = 0.5,
                       mode: str = "unsigned") -> torch.Tensor:
    """w_t = 1 + gamma * clamp(1 - F_{t-1}, 0, 1), F_{t-1} = sum_{k<t} d_k / (sum_k d_k + 1e-8)
    per sequence (row), d_t = |a_t| (`unsigned`) or a_t (`signed`); `none` gives w_t = 1 (OPD).
    Padding has d = 0 and w = 0. No gradient and no normalisation over the batch [code]."""
    if mode == "none":
        return mask.to(a.dtype)
    d = torch.where(mask, a.abs() if mode == "unsigned" else a, 0.0)
    before = d.cumsum(dim=1) - d  # sum_{k<t} d_k: the prefix sum excluding t
    share = before / (d.sum(dim=1, keepdim=True) + 1e-8)
    return torch.where(mask, 1 + gamma * (1 - share).clamp(0, 1), 0.0)


def slice_mask(mask: torch.Tensor, which: str = "all",
               share: tuple[int, int] = SLICE_SHARE) -> torch.Tensor:
    """The tokens that enter the loss: all valid ones, or the first / last `share` = (num, den)
    of each response's valid tokens: k = ceil(num * n / den) of n, in integer arithmetic (a float
    0.3 * 50 rounds up to 16; at least one token of a non-empty response)."""
    if which == "all":
        return mask
    num, den = share
    lengths = mask.sum(dim=1, keepdim=True)  # int64
    keep = (num * lengths + den - 1) // den
    position = torch.arange(mask.shape[1], device=mask.device)[None, :]
    selected = position < keep if which == "first30" else position >= lengths - keep
    return mask & selected


def opd_loss(logp, old_logp, w, a, mask, num_tokens, clip_low=0.2, clip_high=0.2, tis=None):
    """PPO clipped surrogate with A_t = w_t * a_t, summed over the `mask`ed tokens and divided by
    the global token count `num_tokens` (summed over micro-batches and ranks: the global
    token-mean). With old_logp = sg[logp] rho = 1 and grad = -sum w_t a_t grad logp / N. `tis`:
    per-token truncated importance weights (`common.tis_weights`) multiplying each token's term."""
    advantages = (w * a).detach()
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages,
                              ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if tis is not None:
        surrogate = surrogate * tis
    return -torch.where(mask, surrogate, torch.zeros_like(surrogate)).sum() / num_tokens


def third_gaps(a: torch.Tensor, mask: torch.Tensor, rows=None) -> tuple[float, float]:
    """The position-bias signature: mean |a_t| over the first and over the last third (at least
    one token) of each response, summed over the rows (in the order `rows`); an empty response
    counts 0."""
    first = last = 0.0
    for i in range(len(mask)) if rows is None else rows:
        length = int(mask[i].sum())
        third, gap = max(1, length // 3), a[i, :length].abs()
        if length:
            first, last = first + gap[:third].mean(), last + gap[length - third:].mean()
    return first, last


def picture(run, rollouts, step: int, a, w, mask) -> dict:
    """tokens.html: the first rollouts' tokens coloured by a_t and underlined by w_t."""
    args, rows = run.args, []
    for i in range(min(args.picture_rollouts, len(rollouts.responses))):
        text, spans = common.response_token_spans(run.tokenizer, rollouts.responses[i])
        values, weights = a[i][mask[i]].tolist(), w[i][mask[i]].tolist()
        rows.append({"tokens": [text[s:e] for s, e in spans], "values": values,
                     "underline": weights,
                     "hover": [f"A_t=w_t*a_t={u * v:+.3f}" for u, v in zip(weights, values)],
                     "label": f"step {step} | reward {rollouts.rewards[i]:g}\n"
                              f"{rollouts.problems[i // args.num_rollouts]['problem']}"})
    return dict(rows=rows, value_name="a_t", scale=A_SCALE, underline=("w_t", *W_SCALE),
                title=f"{run.dir.name}: a_t and w_t per token",
                note="colour: a_t = log pi_T(y_t) - log pi_old(y_t) in nats, red = the teacher "
                     "likes the sampled token more than the student (pushed up), blue = less "
                     f"(pushed down); underline: the weight w_t (--iw {args.iw}, gamma "
                     f"{args.gamma}; white = 1); hover: A_t = w_t a_t.")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_args(Args, argv)
    common.validate_args(args, RULES)  # every option's range before anything loads: one line
    run = common.setup(args, "iw_opd", EVAL_PROTOCOL, STEP_LINE, group=args.num_rollouts,
                       teacher=args.teacher_model)
    if args.eval_only:
        return common.eval_only(run)
    model, group, world = run.model, args.num_rollouts, run.dist.world_size
    common.print0(f"[iw_opd] {run.dir.name}: {args.num_steps} steps x {args.num_problems} prompts "
                  f"x {group} rollout(s) on {world} rank(s), --iw {args.iw}, --token_slice "
                  f"{args.token_slice}, teacher {args.teacher_model}, device {run.dist.device}")
    for step in common.train_steps(run):
        # ---- 1. rollouts: num_rollouts samples per prompt, this rank's slice of the global batch;
        # their verifier rewards are logged only (OPD's signal is the teacher)
        batch = common.sample_rollouts(run, group)
        responses, n = batch.responses, len(batch.responses)

        # ---- 2. the frozen teacher scores the student's tokens (same prompt), no gradient; the
        # behaviour policy's log-probs are needed apart only when a batch gets several updates
        teacher_logprobs, _, mask_all = common.rollout_logprobs(run, run.teacher, batch.prompts,
                                                                responses)
        if args.num_minibatches > 1:
            behaviour_logprobs, _, _ = common.rollout_logprobs(run, model, batch.prompts, responses)
        loss_mask_all = slice_mask(mask_all, args.token_slice)

        # ---- 3. policy gradient on A_t = w_t * a_t (PPO clip), global token-mean over loss tokens
        model.train()
        a_all, w_all = torch.zeros_like(teacher_logprobs), torch.zeros_like(teacher_logprobs)
        sums, order = dict.fromkeys(["loss", "entropy", "clipped", "tis"], 0.0), []
        per_minibatch = n // args.num_minibatches
        lengths = [len(p) + len(r) for p, r in zip(batch.prompts, responses)]
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            selected = loss_mask_all[owned.start:owned.stop].sum()  # the global token-mean's N
            minibatch_tokens = max(common.all_reduce_sum(selected).item(), 1)
            for rows in common.micro_batches(owned, lengths, args.micro_batch_size,
                                             args.micro_batch_tokens, same_count=True):
                order.append(rows)  # the micro-batches in loss-loop order, for the diagnostics
                logprobs, entropy, mask = common.response_logprobs(
                    model, [batch.prompts[i] for i in rows], [responses[i] for i in rows],
                    run.tokenizer.pad_token_id, args.logprob_chunk_size,
                    temperature=args.temperature)
                cols = slice(0, mask.shape[1])
                # the behaviour policy (the weights that sampled) gives a_t and rho's denominator
                old_logprobs = behaviour_logprobs[rows, cols] if args.num_minibatches > 1 \
                    else logprobs.detach()
                a = sampled_token_advantage(teacher_logprobs[rows, cols], old_logprobs, mask)
                w = importance_weights(a, mask, args.gamma, args.iw)  # the whole response
                a_all[rows, cols], w_all[rows, cols] = a, w
                loss_mask = loss_mask_all[rows, cols]
                tis = None
                if args.tis_cap > 0:
                    tis = common.tis_weights(old_logprobs, batch.sampler_logprobs[rows, cols],
                                             mask, args.tis_cap)
                    sums["tis"] += tis[loss_mask].sum()
                loss = opd_loss(logprobs, old_logprobs, w, a, loss_mask, minibatch_tokens,
                                args.clip_low, args.clip_high, tis)
                (loss * world).backward()  # FSDP averages gradients over ranks; we want the sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[loss_mask]
                sums["loss"] += loss.detach()
                sums["entropy"] += entropy.detach()[mask].sum()
                clipped = (ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)
                sums["clipped"] += clipped.sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.engine.update_weights(model)

        # ---- 4. metrics (the premise: |a_t| early vs late), token picture, checkpoint
        gap_first, gap_last = third_gaps(a_all, mask_all, [i for rows in order for i in rows])
        sums.update(loss_tokens=loss_mask_all.sum(), w=common.loop_sum(w_all, mask_all, order),
                    a=common.loop_sum(a_all, mask_all, order),
                    abs_a=common.loop_sum(a_all.abs(), mask_all, order),
                    gap_first=gap_first, gap_last=gap_last,
                    careful=sum(common.writes_work(text) for text in batch.texts))
        totals, metrics = common.step_metrics(run, batch, sums, grad_norm, args.num_minibatches)
        w_range = common.all_gather_cat(torch.stack([  # [ranks, (min, max)]; inf: no tokens
            torch.where(mask_all, w_all, math.inf).min(),
            torch.where(mask_all, w_all, -math.inf).max()])).view(-1, 2)
        tokens, sequences = totals["tokens"], totals["sequences"]
        loss_tokens = max(totals["loss_tokens"], 1)  # clip_frac, tis: over the tokens in the loss
        metrics.update({
            "w_mean": common.ratio(totals["w"], tokens),
            "w_min": float(w_range[:, 0].min()), "w_max": float(w_range[:, 1].max()),
            "a_abs_mean": common.ratio(totals["abs_a"], tokens),
            "a_mean": common.ratio(totals["a"], tokens),
            "gap_first_third": totals["gap_first"] / sequences,
            "gap_last_third": totals["gap_last"] / sequences,
            "careful_frac": totals["careful"] / sequences,
            "clip_frac": totals["clipped"] / loss_tokens,
            "tis_weight_mean": totals["tis"] / loss_tokens if args.tis_cap > 0 else float("nan")})
        if run.dist.is_main and args.picture_rollouts:
            run.picture = picture(run, batch, step + 1, a_all, w_all, mask_all)
        if common.end_step(run, step, metrics):
            break
    return common.finish(run)


if __name__ == "__main__":
    common.run_main(main)
