"""AntiSD: Anti-Self-Distillation for reasoning RL via pointwise mutual information (2605.11609).

Idea. The policy re-reads its own rollout while shown privileged context c (a verified solution and
a correctness note); per sampled token, teacher and student differ by u_t, the pointwise mutual
information between the token and c. Plain self-distillation rewards +u_t, which boosts tokens that
merely follow from knowing the answer and suppresses deliberation ("Wait", "Maybe"); AntiSD reverses
the sign through a bounded Jensen-Shannon shape phi, adds it to the GRPO advantage, and an entropy
gate switches it off while the teacher has collapsed onto a near-deterministic answer template.

Equations (paper's symbols; sg = stop-gradient):
    A_i^seq = (R_i - mean_G R) / (std_G R + 1e-6)                         GRPO group advantage
    u_{i,t} = log pi_T(y_t | x, c, y_<t) - log pi_S(y_t | x, y_<t)         teacher = policy, no grad
    phi(u)  = 0.5 * (softplus(u) - log 2)                                  phi(0) = 0
    A_{i,t} = A_i^seq - lambda * sg[phi(u_{i,t})]                          u<0 bonus <= 0.5 log 2
    L       = sum_t -min(rho_t A_{i,t}, clip(rho_t, 1-eps_low, 1+eps_high) A_{i,t}) / N_tokens
    gate:   lambda = 0 for `gate_warmup` steps, which record the median teacher entropy H; H_warm =
            their median; then the gate closes when H < tau_down * H_warm and re-opens when
            H >= H_warm.
Sources: [paper] the paper; [2nd] a secondary write-up (the median as the gate statistic); [ours]
where both are silent (the context's wording). Every log-prob and entropy (student, behaviour
policy, teacher) is taken under softmax(logits / --temperature), the distribution the rollouts came
from (verl, TRL), so u_t stays the PMI of one tempered policy; T = 1 by default.
Simplifications, each safe: the teacher is the live policy (the paper's choice), so one model
serves both; one optimizer step per batch (rho = 1) unless --num_minibatches; the toy defaults (lr
1e-4, 60 steps, 64 tokens) only fit the tiny model.
The toy (README, "The toy testbed") builds the premise in: the plain prompt mostly takes the
shortcut (box the answer at once), the careful strategy (steps, checks) is more accurate, and the
self-teacher shown an answer prefers the shortcut, so u < 0 on work and u > 0 on the answer (logged
every step as u_work / u_answer). It tests whether this code turns the premise into the effect,
not whether the premise holds for real models.

    python antisd.py                          # toy, CPU, a few minutes; --lambda_max 0 is GRPO
    python antisd.py --signal sd              # plain self-distillation (+u_t, no gate)
    torchrun --nproc_per_node 2 antisd.py --num_steps 3  # two CPU ranks (gloo, FSDP2)
Paper [paper] (Qwen3-8B, one 8-GPU node; its table: avg@32, Minerva avg@4, T 0.7, top-p 0.95):
    torchrun --nproc_per_node 8 antisd.py --model Qwen3-8B --dataset dapo --eval_dataset math500 \\
        --num_steps 200 --num_problems 32 --num_generations 8 --lr 1e-6 --max_new_tokens 32768 \\
        --activation_checkpointing --eval_every 20 --eval_k 4 --save_every 20
    python antisd.py --eval_only --resume --run_name <run> --model Qwen3-8B \\
        --max_new_tokens 32768 --eval_dataset aime24,aime25,aime26,hmmt25,minerva
"""

import math
import random
import statistics
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F

import common
from common import option

# Privileged context c [paper: verified solution + correctness feedback; wording ours]. The toy
# models are taught this exact form (common.TOY_CONTEXT_HEADER / TOY_FEEDBACK_LINES).
TEACHER_CONTEXT = "Reference solution:\n{solution}\n\n{feedback}"
FEEDBACK = {True: "Your previous attempt was correct.",
            False: "Your previous attempt was incorrect."}
# Evaluation protocol [paper]: avg@32 on AIME24/25/26 and HMMT25, avg@4 on Minerva
EVAL_PROTOCOL = {"aime24": 32, "aime25": 32, "aime26": 32, "hmmt25": 32, "minerva": 4}
STEP_LINE = ("reward", "lambda", "u_work", "u_answer", "step_seconds")  # stdout; all: metrics.jsonl
U_SCALE = (-1.0, 1.0)  # tokens.html colours of u_t in nats: saturated at an e-fold ratio [ours]
ADVANTAGE_SCALE = (-2.0, 2.0)  # GRPO's A_t in group standard deviations [ours]
ROLE_IDS = {"other": 0, "work": 1, "answer": 2}


@dataclass
class Args(common.RunOptions):
    lambda_max: float = option(0.5, "weight of the token term when the gate is open [paper]; "
                                    "0 = GRPO")
    signal: Literal["antisd", "sd"] = option("antisd", "antisd: -phi(u) or -u; sd: +u, no gate "
                                                       "[paper]")
    divergence: Literal["jsd", "rkl"] = option("jsd", "antisd shape: jsd = -phi(u) [paper], "
                                                      "rkl = -u ablation [paper]")
    gate: Literal["entropy", "none"] = option("entropy", "entropy gate with hysteresis [paper], "
                                                         "or none")
    gate_warmup: int = option(5, "steps with lambda = 0 that calibrate H_warm [paper]")
    tau_down: float = option(0.93, "gate closes below tau_down * H_warm [paper; ablations 0.90, "
                                   "0.95]")
    # the GRPO core [paper setting via verl]
    num_generations: int = option(8, "rollouts per problem G [paper: 8]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low")
    clip_high: float = option(0.28, "PPO ratio clip eps_high (DAPO clip-higher)")
    scale_rewards: bool = option(True, "divide group advantages by the group std (false = "
                                       "Dr.GRPO)")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")


RULES = {  # valid ranges of AntiSD's own options; the shared ones: common.ARG_RULES
    "num_generations": ((lambda g: g >= 2), ">= 2 (GRPO's baseline is the group mean of at "
                                            "least 2 rollouts)"),
    "lambda_max": common.at_least(0),
    "gate_warmup": common.at_least(0),
    "tau_down": common.between(0, 1, low_open=True),
    "picture_rollouts": common.at_least(0),
}


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_rewards: bool = True) -> torch.Tensor:
    """A_i^seq for rewards [problems, G]: group-centred, divided by the group's (sample) std +
    1e-6. A group whose rewards are all equal gets 0 (no NaN)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-6) if scale_rewards else centred


def phi(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 0.5 (softplus(u) - log 2): the JSD-derived shape; phi(0) = 0, phi > -0.5 log 2."""
    return 0.5 * (F.softplus(u) - math.log(2.0))


def token_signal(u: torch.Tensor, signal: str = "antisd", divergence: str = "jsd"):
    """delta_t, the dense per-token credit added to A^seq with weight lambda."""
    if signal == "sd":
        return u  # default self-distillation: reverse-KL descent rewards +u_t
    return -u if divergence == "rkl" else -phi(u)  # AntiSD: reverse-KL ascent or JSD ascent


def policy_loss(logprobs, old_logprobs, advantages, mask, num_tokens, clip_low=0.2,
                clip_high=0.28, tis=None):
    """Clipped surrogate summed over valid tokens, divided by the global valid-token count: summed
    over micro-batches and ranks it is the global token-mean for any split. `tis`: per-token
    truncated importance weights (`common.tis_weights`) multiplying each token's term."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages,
                              ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if tis is not None:
        surrogate = surrogate * tis
    return -torch.where(mask, surrogate, torch.zeros_like(surrogate)).sum() / num_tokens


@dataclass
class EntropyGate:
    """Schmitt trigger on the step's median teacher entropy H: `update` says if lambda is on."""

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
    span = common.answer_span(text)
    return text[: span[1]].strip() if span else None


def teacher_contexts(texts: list[str], rewards: list[float], group_size: int, problems: list[dict],
                     rng: random.Random) -> list[str]:
    """Privileged context c for every rollout: a verified solution from a *different* successful
    rollout of the same group, else the reference solution (else the answer), plus feedback."""
    contexts = []
    for i, text in enumerate(texts):
        group = range(i - i % group_size, i - i % group_size + group_size)
        others = [s for j in group
                  if j != i and rewards[j] > 0 and (s := verified_solution(texts[j]))]
        problem = problems[i // group_size]
        solution = rng.choice(others) if others else \
            (problem["solution"] or f"\\boxed{{{problem['answer']}}}")
        feedback = FEEDBACK[rewards[i] > 0]
        contexts.append(TEACHER_CONTEXT.format(solution=solution, feedback=feedback))
    return contexts


def role_ids(tokenizer, responses: list[list[int]], rewards: list[float], width: int):
    """[N, width] per token: 1 = work (deliberation, checks), 2 = the final answer, 0 = other; only
    correct rollouts are marked. Logged so every run shows the premise: u < 0 on work tokens and
    u > 0 on answer tokens."""
    roles = torch.zeros(len(responses), width, dtype=torch.long)
    for i, response in enumerate(responses):
        if rewards[i] > 0:
            spans = common.token_roles(*common.response_token_spans(tokenizer, response))
            roles[i, : len(spans)] = torch.tensor([ROLE_IDS[r] for r in spans])
    return roles


def picture(run, rollouts, step: int, values, mask, bonus, use_teacher: bool) -> dict:
    """tokens.html: u_t per token with the bonus on hover (GRPO: the advantage each token gets)."""
    tokenizer, group, rows = run.tokenizer, run.args.num_generations, []
    for i in range(min(run.args.picture_rollouts, len(rollouts.responses))):
        text, spans = common.response_token_spans(tokenizer, rollouts.responses[i])
        valid = mask[i]
        rows.append({"tokens": [text[a:b] for a, b in spans], "values": values[i][valid].tolist(),
                     "hover": [f"bonus={b:+.3f}" for b in bonus[i][valid].tolist()]
                     if use_teacher else None,
                     "label": f"step {step} | reward {rollouts.rewards[i]:g}\n"
                              f"{rollouts.problems[i // group]['problem']}"})
    if use_teacher:
        return dict(rows=rows, value_name="u_t", scale=U_SCALE,
                    title=f"{run.dir.name}: u_t per token",
                    note="u_t = log pi_T(y_t|x,c) - log pi_S(y_t|x) in nats: red = the teacher "
                         "shown a verified solution likes the token more (AntiSD penalises it), "
                         "blue = less (bonus).")
    return dict(rows=rows, value_name="A_t", scale=ADVANTAGE_SCALE,
                title=f"{run.dir.name}: advantage per token",
                note="GRPO (--lambda_max 0, no teacher pass): every token of a rollout gets its "
                     "group advantage A_i (in group standard deviations); red = reinforced, blue = "
                     "discouraged.")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = common.parse_args(Args, argv)
    common.validate_args(args, RULES)  # every option's range before anything loads: one line
    if args.gate == "entropy" and args.signal == "antisd" and args.gate_warmup < 1:
        raise common.UserError("--gate entropy needs --gate_warmup >= 1 to calibrate H_warm "
                               "(or use --gate none).")
    run = common.setup(args, "antisd", EVAL_PROTOCOL, STEP_LINE, group=args.num_generations)
    gate = EntropyGate(**run.state.get("gate", asdict(EntropyGate(args.gate_warmup,
                                                                  args.tau_down))))
    if args.eval_only:
        return common.eval_only(run)
    use_gate = args.gate == "entropy" and args.signal == "antisd"  # sd runs ungated [paper]
    use_teacher = args.lambda_max != 0  # 0 is GRPO: the term is never on, no teacher pass
    model, group, world = run.model, args.num_generations, run.dist.world_size
    common.print0(f"[antisd] {run.dir.name}: {args.num_steps} steps x {args.num_problems} problems "
                  f"x {group} rollouts on {world} rank(s), device {run.dist.device}")
    for step in common.train_steps(run):
        # ---- 1. rollouts: G samples per problem, this rank's slice of the global batch
        batch = common.sample_rollouts(run, group)
        responses, n = batch.responses, len(batch.responses)

        # ---- 2. verifier rewards and GRPO group advantages A_i^seq
        reward_groups = torch.tensor(batch.rewards).view(-1, group)
        sequence_advantages = group_advantages(reward_groups, args.scale_rewards).flatten()

        # ---- 3. privileged context c from another successful rollout of the group; the teacher
        # (the live policy shown c) scores the rollout: log-probs and entropies, no gradient
        if use_teacher:
            context_rng = random.Random(f"{args.seed}/{step}/{run.dist.rank}")  # resume-exact
            contexts = teacher_contexts(batch.texts, batch.rewards, group, batch.problems,
                                        context_rng)
            teacher_prompts = [
                common.build_prompt(run.tokenizer, batch.problems[i // group]["problem"],
                                    contexts[i], enable_thinking=args.enable_thinking)
                for i in range(n)]
            teacher_logprobs, teacher_entropy, mask = common.rollout_logprobs(
                run, model, teacher_prompts, responses)
        # the behaviour policy's log-probs are needed apart only when a batch gets several updates
        if args.num_minibatches > 1:
            behaviour_logprobs, _, _ = common.rollout_logprobs(run, model, batch.prompts, responses)

        # ---- 4. entropy gate on the median teacher entropy of the global batch
        teacher_entropy_median, gate_on = float("nan"), False  # GRPO: no teacher, no gate
        if use_teacher:
            entropies = common.all_gather_cat(teacher_entropy[mask])
            teacher_entropy_median = float(np.median(entropies.numpy()))
            gate_on = gate.update(step, teacher_entropy_median) if use_gate else True
        lam = args.lambda_max if gate_on else 0.0

        # ---- 5. policy gradient on A_{i,t} = A_i^seq + lambda * sg[delta_t], global token-mean
        model.train()
        width = max([1] + [len(r) for r in responses])
        u_all = torch.zeros(n, width, device=run.dist.device)  # u_t (GRPO: A_t), for metrics
        mask_all = torch.zeros(n, width, dtype=torch.bool, device=run.dist.device)
        sums, order = dict.fromkeys(["loss", "entropy", "clipped", "tis"], 0.0), []
        per_minibatch = n // args.num_minibatches
        lengths = [len(p) + len(r) for p, r in zip(batch.prompts, responses)]
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            minibatch_tokens = common.all_reduce_sum(sum(len(responses[i]) for i in owned)).item()
            for rows in common.micro_batches(owned, lengths, args.micro_batch_size,
                                             args.micro_batch_tokens, same_count=True):
                order.append(rows)  # the micro-batches in loss-loop order, for the diagnostics
                logprobs, entropy, mask = common.response_logprobs(
                    model, [batch.prompts[i] for i in rows], [responses[i] for i in rows],
                    run.tokenizer.pad_token_id, args.logprob_chunk_size,
                    temperature=args.temperature)
                cols = slice(0, mask.shape[1])
                # the behaviour policy (the weights that sampled) gives the ratio's denominator
                old_logprobs = behaviour_logprobs[rows, cols] if args.num_minibatches > 1 \
                    else logprobs.detach()
                advantages = sequence_advantages[rows].to(mask.device)[:, None].expand(mask.shape)
                if use_teacher:  # u_t, against the behaviour policy
                    u = torch.where(mask, teacher_logprobs[rows, cols] - old_logprobs, 0.0)
                    advantages = advantages + lam * token_signal(u, args.signal, args.divergence)
                u_all[rows, cols], mask_all[rows, cols] = (u if use_teacher else advantages), mask
                tis = None
                if args.tis_cap > 0:
                    tis = common.tis_weights(old_logprobs, batch.sampler_logprobs[rows, cols],
                                             mask, args.tis_cap)
                    sums["tis"] += tis[mask].sum()
                loss = policy_loss(logprobs, old_logprobs, advantages, mask, minibatch_tokens,
                                   args.clip_low, args.clip_high, tis)
                (loss * world).backward()  # FSDP averages gradients over ranks; we want the sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[mask]
                sums["loss"] += loss.detach()
                sums["entropy"] += entropy.detach()[mask].sum()
                clipped = (ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)
                sums["clipped"] += clipped.sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.engine.update_weights(model)

        # ---- 6. metrics (the premise: u on work and answer tokens), token picture, checkpoint
        sums.update(careful=sum(common.writes_work(text) for text in batch.texts),
                    zero_adv_groups=int((reward_groups.max(1).values
                                         == reward_groups.min(1).values).sum()))
        bonus = lam * token_signal(u_all, args.signal, args.divergence)
        if use_teacher:
            roles = role_ids(run.tokenizer, responses, batch.rewards, width).to(u_all.device)
            sums.update(u_negative=(u_all[mask_all] < 0).sum(),
                        u=common.loop_sum(u_all, mask_all, order),
                        bonus=common.loop_sum(bonus, mask_all, order),
                        u_work=common.loop_sum(u_all, roles == 1, order),
                        work_tokens=(roles == 1).sum(),
                        u_answer=common.loop_sum(u_all, roles == 2, order),
                        answer_tokens=(roles == 2).sum())
        totals, metrics = common.step_metrics(run, batch, sums, grad_norm, args.num_minibatches)
        nan, tokens = float("nan"), totals["tokens"]
        metrics.update({
            "gate_open": float(gate_on), "lambda": lam,
            "H_warm": gate.h_warm if use_gate and gate.h_warm is not None else nan,
            "teacher_entropy_median": teacher_entropy_median,
            "u_neg_frac": totals.get("u_negative", nan) / tokens,
            "u_mean": totals.get("u", nan) / tokens,
            "token_bonus_mean": totals.get("bonus", 0.0) / tokens,
            "u_work": common.ratio(totals.get("u_work", nan), totals.get("work_tokens", 0)),
            "u_answer": common.ratio(totals.get("u_answer", nan), totals.get("answer_tokens", 0)),
            "careful_frac": totals["careful"] / totals["sequences"],
            "zero_adv_groups": totals["zero_adv_groups"] / args.num_problems})
        if run.dist.is_main:
            run.picture = picture(run, batch, step + 1, u_all, mask_all, bonus, use_teacher)
        if common.end_step(run, step, metrics, {"gate": asdict(gate)}):
            break
    return common.finish(run)


if __name__ == "__main__":
    common.run_main(main)
