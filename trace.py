"""TRACE: token-routed self on-policy alignment, distilling only on critical spans (arXiv 2605.10194).

Idea. Self-distillation over the whole response spends its gradient on redundant tokens and leaks
the privileged context into every position. TRACE asks an annotator for the few critical spans of
each rollout (key steps of a correct one, the first error of an incorrect one) and a coarse type
label; a self-teacher (the same model shown the label as a private note) is distilled into the
student only on those spans, with forward KL on key spans or reverse KL on error spans, and GRPO
trains every other token. The KL channel is annealed to zero after a short window, so the total
privileged-gradient exposure stays finite and later steps are plain GRPO.

Equations (sg = stop-gradient; y = a rollout, S = its routed tokens, N = the others):
    A_i     = (R_i - mean_G R) / (std_G R + 1e-6)                            GRPO group advantage
    l_t     = -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i)         clip-higher surrogate
    S       = key spans K_y of correct rollouts    (--route fkl_key:   D_t = KL(pi_T || pi_S))
              error spans E_y of incorrect ones    (--route rkl_error: D_t = KL(pi_S || pi_T))
              both                                 (--route both), |S| <= alpha |y| per rollout
    D'_t    = D_t * min(1, c / sg[D_t])            (--kl_clip c, the default rescale: bounded by c,
                                                    gradient direction kept; --kl_clip_mode clamp:
                                                    min(D_t, c), no gradient above c; c = 0: off)
    L       = [sum_{t in N} l_t + (1 - lambda_k/lambda_0) sum_{t in S} l_t + lambda_k sum_{t in S} D'_t]
              / N_tokens                           (global token-mean; --kl_norm span: the KL term is
                                                    sum_i sum_{t in S_i} D'_t / |y_i| / N_sequences)
    lambda_k = lambda_0 for k < kl_hold, then linear to 0 at k = kl_end; from kl_end on no
              annotation, no teacher forward, the teacher copy is freed: the step is a GRPO step.
The KL is over the full vocabulary, computed in chunks of positions (common.token_kl).
Temperature: the sampled tokens' log-probs (rho_t, and the teacher-vs-student gap metric) use
softmax(logits / --temperature), the distribution the rollouts were drawn from, as verl and TRL do;
the KL D_t compares the two models' own distributions (T = 1) [ours]. At the default T = 1 they agree.

Where the numbers come from: [paper] the TRACE paper; [2nd] a secondary write-up; [ours] our choice
where the sources are silent (every [ours]/[2nd] item is an option). [paper]: annotator spans and a
coarse type label, key spans on correct / error spans on incorrect rollouts, alpha = 0.25, teacher =
the same model with the label as a private prefix and never the span positions, routes fkl_key
(Qwen3-8B) / rkl_error (Qwen3-1.7B) / both, GRPO elsewhere, clip-higher 0.2/0.28, self annotation
by the policy and a strong API annotator. [2nd]: the loss above, lambda_0 = 0.5, the schedule
10 -> 40, teacher refresh every 10 steps, a "pointwise KL clip 0.05" (its form is unknown; the
rescale keeps the gradient where forward KL lifts under-allocated teacher tokens, a hard clamp would
zero it; README, TRACE), the span-mean KL norm, segments = response lines. [ours]: segment splitting of
long lines (--max_segment_chars), the truncation of the last span at the coverage cap, the JSON
answer format, the label set, the prompt templates, annotating by default only the rollouts the route uses (--annotate),
the `random` control, the `oracle` on the toy, the teacher contexts' wording (`label+solution`
adds the reference solution), and the toy defaults (lr 1e-4, 64 tokens, 60 steps).

Run:
    python trace.py --annotator oracle --teacher_context label+solution   # toy, CPU (see README)
    python trace.py --annotator oracle --route rkl_error                   # reverse KL on error spans
    python trace.py --annotator random                                     # length-matched random spans
    python trace.py --annotator self --annotator_patience 0  # the policy annotates itself
    python trace.py --lambda_0 0                                           # GRPO baseline
    torchrun --nproc_per_node 2 trace.py --annotator oracle --num_steps 3  # two CPU ranks (gloo, FSDP2)
Paper (Qwen3-8B, forward KL on key spans, an API annotator, one 8-GPU node; eval at T 0.6, top-p
0.95, top-k 20 [paper]; steps, batch and lengths [ours]; for Qwen3-1.7B: --route rkl_error):
    torchrun --nproc_per_node 8 trace.py --model Qwen3-8B --route fkl_key --annotator api \\
        --annotator_url https://host/v1 --annotator_model <name> --annotator_key_env MY_KEY \\
        --dataset openthoughts-math --eval_dataset math500 --num_steps 400 --num_problems 32 \\
        --num_generations 8 --lr 1e-6 --max_new_tokens 16384 --micro_batch_size 2 \\
        --eval_temperature 0.6 --eval_top_p 0.95 --eval_top_k 20 --eval_every 20 --save_every 20
    python trace.py --eval_only --model runs/<run>/checkpoints/step_000400 \\
        --eval_dataset math500,aime24,aime25,amc23,gpqa --eval_temperature 0.6 --eval_top_k 20
On a GPU `--rollout auto` samples with vLLM (README, "vLLM rollouts"; the `self` annotator then
generates through it too); `--tis_cap 2` adds the sampler/trainer correction.
On the toy task every line is re-computable, so `parse_toy_steps` names the exact key step of a
correct response and the first wrong line of an incorrect one (the `oracle` annotator).
This file shares its name with the standard library's `trace` module: importing it has no side
effects, and nothing this project runs imports the standard one (tests/test_trace.py checks both).
"""

import gc
import json
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common import (GracefulStop, Grader, ProblemSampler, RunLogger, RunOptions, SamplingParams,
                    TOY_CONTEXT_HEADER, UserError, above, all_gather_cat, all_reduce_sum, at_least,
                    between, build_prompt, copy_weights, eval_command, eval_dataset_names,
                    eval_only_table, evaluate, grader_for, init_distributed, load_checkpoint,
                    load_eval_benchmarks, load_model, load_run_problems, load_tokenizer,
                    make_engine, micro_batches, off_eval_schedule, option, output_head, padded_rows,
                    parse_args, parse_eval_k, parse_toy_steps, prepare_run_dir, print0,
                    resolve_model, response_hidden, response_token_spans, run_main, save_checkpoint,
                    stop_token_ids, token_kl, token_logprob_entropy, validate_args, vllm_options,
                    write_token_picture, writes_work)

ROUTE_COLOURS = {  # tokens.html: routing classes are categories, drawn as such [ours]
    1.0: ("fkl: forward KL (key span of a correct rollout)", "#66c2a5"),
    -1.0: ("rkl: reverse KL (error span of an incorrect rollout)", "#fc8d62"),
    0.0: ("GRPO only (not routed)", "transparent")}
# Coarse type labels an annotator may give [ours: the paper names "a coarse type label"]; any other
# text is kept, truncated to LABEL_CHARS.
LABELS = ("key step", "answer", "arithmetic", "logic", "setup", "check", "other")
LABEL_CHARS = 40
# What the annotator is asked [ours]. Segments are numbered from 1.
ANNOTATOR_PROMPT = (
    "You review a student's solution to a math problem. Its final answer is {verdict}.\n\n"
    "Problem: {problem}\n\nSolution, one numbered segment per line:\n{segments}\n\n{task}\n"
    'Reply with one JSON object only, for example {{"spans": [2], "label": "arithmetic"}}, where "spans" '
    'lists segment numbers and "label" is one of: {labels}.')
ANNOTATOR_TASK = {True: "Name the key segments: the one or few steps the correct answer rests on.",
                  False: "Name the segments where the first error is made."}
# The teacher's private context: the type label [paper], or the reference solution and the label
# [ours]; the correctness line is the toy's feedback line (common.TOY_FEEDBACK_LINES). Never spans.
FEEDBACK = {True: "Your previous attempt was correct.", False: "Your previous attempt was incorrect."}
TEACHER_CONTEXT = {"label": "{feedback}\nType: {label}.",
                   "label+solution": TOY_CONTEXT_HEADER + "{solution}\n\n{feedback}\nType: {label}."}
# Evaluation protocol: the paper reports avg@k on four math benchmarks and GPQA-Diamond with k not
# in the sources we could read; the benchmarks keep the table's k (common.DATASETS).
EVAL_PROTOCOL: dict = {}

RULES = {
    "num_generations": ((lambda g: g >= 2), ">= 2 (GRPO's baseline is the group mean of at least 2 rollouts)"),
    "lambda_0": at_least(0),
    "kl_hold": at_least(0),
    "kl_end": at_least(0),
    "alpha": between(0, 1),
    "kl_clip": at_least(0),
    "teacher_sync_every": at_least(1),
    "max_segment_chars": at_least(8),
    "random_coverage": between(0, 1),
    "annotator_max_tokens": at_least(1),
    "annotator_timeout": above(0),
    "annotator_retries": at_least(0),
    "annotator_patience": at_least(0),
    "annotator_concurrency": at_least(1),
    "picture_rollouts": at_least(0),
}

# how and where the same annotator is asked, and how many failed steps stop the run: a --resume
# may change these (common.SAFE_ON_RESUME), e.g. to continue a run stopped by a failing endpoint
SAFE_ON_RESUME = {"annotator_url", "annotator_key_env", "annotator_timeout", "annotator_retries",
                  "annotator_concurrency", "annotator_patience"}


# The step's stdout line (<= 120 columns): KL weight, routed spans; all: metrics.jsonl
STEP_LINE = ("reward", "lambda_k", "kl_routed", "coverage", "step_seconds")


@dataclass
class Args(RunOptions):
    # TRACE
    route: Literal["fkl_key", "rkl_error", "both"] = option("fkl_key", "fkl_key: forward KL on key spans of correct "
                                                                       "rollouts [paper, Qwen3-8B]; rkl_error: reverse "
                                                                       "KL on error spans of incorrect ones [paper, "
                                                                       "Qwen3-1.7B]; both")
    annotator: Literal["self", "api", "oracle", "random"] = option("self", "self: the policy, greedy [paper]; api: an "
                                                                           "OpenAI-compatible endpoint [paper]; "
                                                                           "oracle: toy only [ours]; random: "
                                                                           "length-matched random spans [ours]")
    annotate: Literal["routed", "all"] = option("routed", "rollouts sent to the annotator: routed = only the class "
                                                          "the route trains (correct ones for fkl_key, incorrect "
                                                          "for rkl_error) [ours: saves cost]; all = every rollout "
                                                          "[paper] (the other class's spans enter the metrics only)")
    teacher_context: Literal["label", "label+solution"] = option("label", "teacher's private context: the type "
                                                                          "label [paper], or the reference solution "
                                                                          "and the label [ours]")
    lambda_0: float = option(0.5, "KL weight during the hold [2nd]; 0 = GRPO (no annotation, no teacher)")
    kl_hold: int = option(10, "steps 0..kl_hold-1 use lambda_0 [2nd]")
    kl_end: int = option(40, "lambda reaches 0 at this step; from here on pure GRPO [2nd]")
    alpha: float = option(0.25, "coverage cap: routed tokens <= alpha * |y| per rollout [paper]")
    kl_clip: float = option(0.05, "bound on each routed token's KL [2nd: 0.05; form ours, see --kl_clip_mode]; 0 = off")
    kl_clip_mode: Literal["rescale", "clamp"] = option("rescale", "rescale: D * min(1, c/sg[D]), gradient kept "
                                                                  "[ours]; clamp: min(D, c), no gradient above c")
    kl_norm: Literal["token", "span"] = option("token", "token: global token-mean like GRPO; span: per response "
                                                        "sum_S D / |y|, mean over responses [2nd]")
    teacher_sync_every: int = option(10, "refresh the frozen teacher copy every N steps [2nd]; 1 = the live "
                                         "weights, no copy")
    max_segment_chars: int = option(200, "a response line longer than this is split into several segments [ours]")
    random_coverage: float = option(0.1, "--annotator random off the toy: share of |y| per rollout (on the toy: "
                                         "the oracle's span size) [ours]")
    annotator_max_tokens: int = option(64, "tokens of the annotator's JSON answer (self: new tokens; api: max_tokens)")
    annotator_thinking: bool = option(False, "self: the Qwen3 template's thinking switch for annotation prompts")
    annotator_url: str = option("", "api: base URL of an OpenAI-compatible server (.../v1) or its "
                                    "/chat/completions endpoint")
    annotator_model: str = option("", "api: the model name sent to the endpoint")
    annotator_key_env: str = option("", "api: name of the environment variable holding the API key (never logged)")
    annotator_timeout: float = option(10.0, "api: seconds per request attempt")
    annotator_retries: int = option(1, "api: retries after a failed attempt (HTTP 429/5xx, "
                                       "network, timeout)")
    annotator_patience: int = option(3, "stop the run when no annotation succeeds in this many "
                                        "consecutive steps; 0 = train on (those steps are GRPO)")
    annotator_concurrency: int = option(8, "api: requests in flight at once")
    # shared by every script, with this paper's defaults and sources (the rest: common.RunOptions)
    model: str = option("toy", "policy: toy | toy-large | alias (Qwen3-8B, ...) | hub id | local dir")
    dataset: str = option("toy", "train problems: toy | hub id | .jsonl/.json/.parquet")
    solution_key: str = option("solution", "column with a reference solution (optional; --teacher_context "
                                           "label+solution)")
    num_steps: int = option(60, "optimizer steps [ours: 60 on the toy]")
    run_name: str = option("", "run directory under --output_dir; default "
                           "trace_<route>_<model>_s<seed>_<start time>")
    # rollouts
    num_problems: int = option(32, "problems per step, global [ours: 32 on the toy]")
    num_generations: int = option(8, "rollouts per problem G [ours: 8]")
    max_new_tokens: int = option(64, "response token limit [ours: 64 on the toy]")
    temperature: float = option(1.0, "rollout sampling temperature [ours]")
    top_p: float = option(1.0, "rollout nucleus sampling [ours]")
    top_k: int = option(0, "rollout top-k, 0 = off [ours]")
    enable_thinking: Optional[bool] = option(None, "Qwen3 chat template thinking switch (unset = template default)")
    gen_batch_size: int = option(256, "sequences per generation batch of the hf engine [ours]")
    # optimisation
    lr: float = option(1e-4, "AdamW learning rate [ours: 1e-4 for the tiny toy model; paper setting via verl]")
    max_grad_norm: float = option(1.0, "gradient-norm clip [paper setting via verl]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low [paper]")
    clip_high: float = option(0.28, "PPO ratio clip eps_high, DAPO clip-higher [paper]")
    scale_rewards: bool = option(True, "divide group advantages by the group std (false = Dr.GRPO)")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")
    logprob_chunk_size: int = option(512, "positions per chunk of the full-vocabulary log-prob/KL")
    # evaluation, checkpoints
    eval_k: str = option("", "samples per eval problem (avg@k, pass@k): empty = each benchmark's default "
                         "(toy 4) | one int | name=k pairs, e.g. aime24=32,math500=4")
    eval_temperature: float = option(0.7, "eval sampling temperature [ours; paper: 0.6, top-p 0.95, top-k 20]")
    eval_top_p: float = option(0.95, "eval nucleus sampling [paper]")
    eval_top_k: int = option(0, "eval top-k, 0 = off [paper: 20]")
    picture_rollouts: int = option(16, "rollouts of the latest step drawn in tokens.html (at each eval and the end)")


# ---------------------------------------------------------------------------------------------
# The method's math: small pure functions
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, scale_rewards: bool = True) -> torch.Tensor:
    """A_i for rewards [problems, G]: group-centred, divided by the group's (sample) std + 1e-6.
    A group whose rewards are all equal gets 0 (no NaN)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-6) if scale_rewards else centred


def kl_weight(step: int, lambda_0: float = 0.5, kl_hold: int = 10, kl_end: int = 40) -> float:
    """lambda_k: lambda_0 for step < kl_hold, then linear to 0 at kl_end, 0 afterwards (0-based steps)."""
    if step < kl_hold:
        return lambda_0
    if step >= kl_end:
        return 0.0
    return lambda_0 * (kl_end - step) / (kl_end - kl_hold)


def policy_loss(logprobs, old_logprobs, advantages, weights, num_tokens, clip_low=0.2, clip_high=0.28, tis=None):
    """Clipped surrogate times a per-token weight (1 on N, 1 - lambda_k/lambda_0 on S, 0 on padding),
    summed and divided by the global valid-token count (sum over micro-batches and ranks = token-mean).
    `tis`: per-token truncated importance weights (`tis_weights`) multiplying each token's term."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    if tis is not None:
        surrogate = surrogate * tis
    return -torch.where(weights > 0, weights * surrogate, torch.zeros_like(surrogate)).sum() / num_tokens


def tis_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling between the sampler (vLLM: another kernel, bf16) and the trainer
    [TRL `vllm_importance_sampling_correction`, mode token_truncate; verl rollout correction]:
    w_t = min(exp(log pi_train(y_t) - log pi_sampler(y_t)), cap), no gradient; 1 where masked."""
    w = torch.exp(train_logprobs.detach() - sampler_logprobs).clamp(max=cap)
    return torch.where(mask, w, torch.ones_like(w))


def bound_kl(d: torch.Tensor, kl_clip: float = 0.05, mode: str = "rescale") -> torch.Tensor:
    """The --kl_clip bound per token: rescale D * min(1, c / sg[D]) (value min(D, c), gradient direction of
    D kept, scaled by c/D above c); clamp min(D, c) (no gradient above c); c = 0: D unchanged."""
    if kl_clip <= 0:
        return d
    if mode == "clamp":
        return d.clamp(max=kl_clip)
    return d * (kl_clip / d.detach().clamp_min(kl_clip))  # = min(1, c / sg[D]) for D >= 0


def routed_kl(student_head, student_hidden, teacher_head, teacher_hidden, mask, direction, chunk_size=512):
    """Full-vocabulary KL per token ([B,R], 0 outside `mask`), chunked over positions: `forward` =
    KL(pi_T || pi_S), `reverse` = KL(pi_S || pi_T). The teacher's logits never carry a gradient (its
    head may be the live policy's)."""

    def frozen_teacher(h):
        with torch.no_grad():
            return teacher_head(h)

    return token_kl(student_head, student_hidden, frozen_teacher, teacher_hidden.detach(), mask, direction, chunk_size)


# ---------------------------------------------------------------------------------------------
# Segments: response lines -> numbered segments -> token positions
# ---------------------------------------------------------------------------------------------


def response_text(tokenizer, response: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character span per token) of a response, special tokens blanked to spaces of the same
    length (offsets unchanged), so no segment contains an end-of-turn marker."""
    text, spans = response_token_spans(tokenizer, response)
    special = set(tokenizer.all_special_ids)
    chars = list(text)
    for token, (start, end) in zip(response, spans):
        if token in special:
            chars[start:end] = " " * (end - start)
    return "".join(chars), spans


def split_segments(text: str, max_chars: int = 200) -> list[tuple[int, int]]:
    """Character spans of the numbered segments: the non-blank lines (surrounding whitespace trimmed);
    a line longer than `max_chars` is cut into pieces of at most `max_chars`, after the last space of a
    piece when it has one."""
    segments, position = [], 0
    for line in text.split("\n"):
        start, end = position, position + len(line)
        position = end + 1
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        while end - start > max_chars:
            cut = text.rfind(" ", start + 1, start + max_chars + 1)
            cut = cut if cut > start else start + max_chars
            piece_end = cut
            while piece_end > start and text[piece_end - 1].isspace():
                piece_end -= 1
            segments.append((start, piece_end))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        if end > start:
            segments.append((start, end))
    return segments


def segment_tokens(token_spans: list[tuple[int, int]], segments: list[tuple[int, int]]) -> list[list[int]]:
    """Per segment, the positions of the tokens whose character span overlaps it (a segment that starts
    or ends inside a token includes that token; an empty-span token counts where it stands)."""
    out = []
    for seg_start, seg_end in segments:
        out.append([i for i, (a, b) in enumerate(token_spans)
                    if (max(a, seg_start) < min(b, seg_end)) or (a == b and seg_start <= a < seg_end)])
    return out


def capped_mask(chosen: list[int], seg_tokens: list[list[int]], length: int, alpha: float = 0.25) -> torch.Tensor:
    """Bool [length] of the routed tokens: the chosen segments in the annotator's order, each adding its
    tokens not yet routed, until the total would exceed floor(alpha * length); the segment that crosses
    the cap keeps only its first tokens up to it [ours], later ones are dropped."""
    mask = torch.zeros(length, dtype=torch.bool)
    budget = math.floor(alpha * length + 1e-9)
    for segment in chosen:
        new = [t for t in seg_tokens[segment] if not mask[t]]
        take = new[:budget - int(mask.sum())]
        mask[take] = True
        if len(take) < len(new):
            break
    return mask


# ---------------------------------------------------------------------------------------------
# Annotators: each returns, per request, (segment indices 0-based, label) or None (no spans, counted)
# ---------------------------------------------------------------------------------------------


@dataclass
class Request:
    problem: str
    text: str                       # response text, special tokens blanked
    segments: list                  # character spans
    correct: bool


def annotator_prompt(request: Request) -> str:
    numbered = "\n".join(f"[{k + 1}] {request.text[a:b]}" for k, (a, b) in enumerate(request.segments))
    return ANNOTATOR_PROMPT.format(verdict="correct" if request.correct else "incorrect", problem=request.problem,
                                   segments=numbered or "(empty)", task=ANNOTATOR_TASK[request.correct],
                                   labels=", ".join(LABELS))


def parse_annotation(answer: str, num_segments: int) -> Optional[tuple[list[int], str]]:
    """The first JSON object in `answer` with "spans": a list of integers in 1..num_segments (duplicates
    dropped, order kept; [] allowed) -> (0-based indices, label). The label is one of LABELS
    (case-insensitive), else free text cut to LABEL_CHARS, else "other". Anything else -> None."""
    decoder, position = json.JSONDecoder(), answer.find("{")
    while position != -1:
        try:
            value, _ = decoder.raw_decode(answer, position)
        except ValueError:
            position = answer.find("{", position + 1)
            continue
        if not isinstance(value, dict):
            return None
        spans = value.get("spans")
        if not isinstance(spans, list) or not all(type(s) is int and 1 <= s <= num_segments for s in spans):
            return None
        label = value.get("label")
        label = " ".join(label.split())[:LABEL_CHARS] if isinstance(label, str) else ""
        label = next((known for known in LABELS if known == label.lower()), label) or "other"
        return list(dict.fromkeys(s - 1 for s in spans)), label
    return None


def oracle_annotation(request: Request) -> tuple[list[int], str]:
    """The toy's exact spans (`parse_toy_steps`): a correct response's key step = its last step line (the
    answer line of a shortcut); an incorrect one's first wrong line. Label from the line's kind."""
    lines = parse_toy_steps(request.problem, request.text)
    if request.correct:
        steps = [line for line in lines if line["kind"] == "step"] or [l for l in lines if l["kind"] == "answer"]
        chosen, label = steps[-1:], "key step" if steps and steps[-1]["kind"] == "step" else "answer"
    else:
        chosen = [line for line in lines if not line["correct"]][:1]
        label = "other"
        if chosen:
            line = chosen[0]
            label = {"check": "check", "answer": "answer", "other": "other"}.get(line["kind"], "arithmetic")
            step = re.fullmatch(r"(\d+)([+\-*])(\d+)=(-?\d+)", line["text"].strip())
            if step and int(step[4]) == {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}[step[2]](
                    int(step[1]), int(step[3])):
                label = "logic"  # the arithmetic is right: a wrong operand or operation
    segments = [k for k, (a, b) in enumerate(request.segments) for line in chosen
                if max(a, line["start"]) < min(b, line["end"])]
    return list(dict.fromkeys(segments)), label


def random_mask(length: int, size: int, rng: random.Random, valid: Optional[list[int]] = None) -> torch.Tensor:
    """Bool [length]: `size` contiguous positions among `valid` (default all), at a uniform start."""
    valid = list(range(length)) if valid is None else valid
    mask = torch.zeros(length, dtype=torch.bool)
    size = min(size, len(valid))
    if size > 0:
        start = rng.randrange(len(valid) - size + 1)
        mask[valid[start:start + size]] = True
    return mask


def chat_prompt(tokenizer, content: str, enable_thinking: Optional[bool]) -> list[int]:
    """Token ids of a one-message chat prompt (no math instruction: the annotator's own task)."""
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False).input_ids


def self_annotate(engine, tokenizer, requests: list[Request], max_tokens: int,
                  thinking: bool) -> tuple[list, str]:
    """The policy annotates, greedy, through the rollout engine: (annotations, last failure or "").
    Every rank calls the engine with the same number of prompts (FSDP: equal forwards), padding with
    copies of a prompt whose answers are dropped."""
    prompts = [chat_prompt(tokenizer, annotator_prompt(r), thinking) for r in requests]
    count = int(all_gather_cat(torch.tensor([len(prompts)])).max())
    if count == 0:
        return [], ""
    filler = prompts[:1] or [chat_prompt(tokenizer, "{}", thinking)]
    answers = engine.generate(prompts + filler * (count - len(prompts)), SamplingParams(0.0, 1.0, 0, max_tokens),
                              desc="annotate")
    texts = tokenizer.batch_decode(answers[:len(prompts)], skip_special_tokens=True)
    parsed = [parse_annotation(text, len(r.segments)) for text, r in zip(texts, requests)]
    failed = [text for text, answer in zip(texts, parsed) if answer is None]
    error = f"an answer is not the JSON object asked for: {failed[-1][:80]!r}" if failed else ""
    return parsed, error


class ApiAnnotator:
    """POST to an OpenAI-compatible /chat/completions with bounded concurrency, a timeout per attempt and
    retries with exponential backoff on HTTP 429/5xx, network errors and timeouts. A failed request or an
    unparsable answer gives None, and `last_error` says why. Once a request has timed out on every
    attempt, the call sends no more (a hanging endpoint costs one request's attempts per call).
    The key is read from the environment and only sent in the header."""

    def __init__(self, url: str, model: str, key_env: str = "", timeout: float = 10.0,
                 retries: int = 1, concurrency: int = 8, max_tokens: int = 64,
                 backoff: float = 1.0):
        self.url = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.key = os.environ.get(key_env, "") if key_env else ""
        self.failures = 0  # requests that never got an answer (HTTP error, timeout, malformed body)
        self.last_error, self.hanging = "", ""

    def _ask(self, prompt: str) -> Optional[str]:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0, "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})}
        timed_out = False
        for attempt in range(self.retries + 1):
            if self.hanging:
                self.last_error = self.hanging
                return None
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return json.loads(reply.read().decode())["choices"][0]["message"]["content"]
            except urllib.error.HTTPError as error:
                self.last_error, timed_out = f"HTTP {error.code} {error.reason}", False
                if error.code != 429 and error.code < 500:
                    return None  # the request itself is wrong: retrying cannot help
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                timed_out = isinstance(reason, TimeoutError)
                self.last_error = (f"no answer within --annotator_timeout {self.timeout:g} s"
                                   if timed_out else f"{type(reason).__name__}: {reason}")
            except (ValueError, KeyError, IndexError, TypeError) as error:
                self.last_error = (f"the reply is not an OpenAI chat completion "
                                   f"({type(error).__name__}: {str(error)[:80]})")
                return None
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        if timed_out:  # every attempt timed out: the rest of this call would only wait as long
            self.hanging = f"{self.last_error}, {self.retries + 1} attempts"
        return None

    def __call__(self, requests: list[Request]) -> list:
        self.hanging = ""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(lambda r: self._ask(annotator_prompt(r)), requests))
        self.failures += sum(a is None for a in answers)
        parsed = [parse_annotation(a, len(r.segments)) if isinstance(a, str) else None
                  for a, r in zip(answers, requests)]
        unparsable = [a for a, p in zip(answers, parsed) if isinstance(a, str) and p is None]
        if unparsable:
            self.last_error = f"an answer is not the JSON object asked for: {unparsable[-1][:80]!r}"
        return parsed


def teacher_context(mode: str, label: str, correct: bool, problem: dict) -> str:
    """The teacher's private context: the type label and correctness, optionally the reference solution."""
    solution = problem.get("solution") or f"\\boxed{{{problem['answer']}}}"
    return TEACHER_CONTEXT[mode].format(label=label, feedback=FEEDBACK[correct], solution=solution)


def picture_row(tokenizer, problem: dict, response: list[int], reward: float, route: torch.Tensor,
                kl: torch.Tensor, label: str, step: int) -> dict:
    """One row of tokens.html: tokens coloured by routing class (ROUTE_COLOURS), D_t on hover."""
    text, spans = response_token_spans(tokenizer, response)
    return {"tokens": [text[a:b] for a, b in spans], "values": route.tolist(),
            "hover": [f"D={d:.4f}" if r else "" for r, d in zip(route.tolist(), kl.tolist())],
            "label": f"step {step} | reward {reward:g} | {label}\n{problem['problem']}"}


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(Args, argv)
    validate_args(args, RULES)  # every option's range, before anything loads: one-line errors
    eval_ks = parse_eval_k(args.eval_k, eval_dataset_names(args), EVAL_PROTOCOL)  # benchmark -> k
    eval_k = next(iter(eval_ks.values()), 4)  # a training run evaluates on one dataset
    if args.kl_end < args.kl_hold:
        raise UserError(f"--kl_end {args.kl_end} is before --kl_hold {args.kl_hold}: use kl_end >= kl_hold.")
    if args.annotator == "oracle" and args.dataset != "toy":
        raise UserError("--annotator oracle knows the exact spans of the toy task only: use --dataset toy, or "
                        "--annotator self | api | random.")
    if args.annotator == "api" and not (args.annotator_url and args.annotator_model):
        raise UserError("--annotator api needs --annotator_url (an OpenAI-compatible .../v1) and --annotator_model.")
    if args.annotator == "api" and args.annotator_key_env and args.annotator_key_env not in os.environ:
        raise UserError(f"--annotator_key_env names {args.annotator_key_env}, which is not set in the environment.")
    dist_info = init_distributed(args.dist_timeout)
    world, rank = dist_info.world_size, dist_info.rank
    if args.num_problems % world:
        raise UserError(f"--num_problems {args.num_problems} does not divide over {world} ranks: use a multiple "
                        f"of the world size (e.g. {world * max(1, args.num_problems // world)}).")
    sequences = args.num_problems // world * args.num_generations
    if sequences % args.num_minibatches:
        raise UserError(f"--num_minibatches {args.num_minibatches} must divide the {sequences} rollouts per rank.")
    # refuses to reuse a run directory; picks the newest valid checkpoint for --resume
    run = prepare_run_dir(args, f"trace_{args.route}_{Path(args.model).name}_s{args.seed}",
                          dist_info, SAFE_ON_RESUME)
    run_dir, run_name = run.path, run.path.name
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    # ---- data, model, optimizer, engine ----
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
    # ---- the teacher: a frozen copy sharded like the student (refreshed every teacher_sync_every
    # steps while the KL term is on), or the live weights (teacher_sync_every 1); none when lambda
    # is never on.
    start_step = run.resume_step if run.checkpoint is not None else 0
    kl_steps = args.lambda_0 > 0 and start_step < args.kl_end and not args.eval_only
    teacher = None
    if kl_steps and args.teacher_sync_every > 1:
        teacher = load_model(args.model, dist_info, trainable=False)
    refreshes, failed_steps, teacher_stale = 0, 0, False
    if run.checkpoint is not None:
        # a checkpoint between two refreshes holds the teacher copy (save_checkpoint's `frozen`):
        # re-copying it from the resumed weights would give another teacher than the uninterrupted
        # run's
        restored = load_checkpoint(run.checkpoint, model, optimizer, dist_info,
                                   frozen={"teacher": teacher} if teacher is not None else None)
        start_step = restored["step"]
        sampler.load_state_dict(restored["state"]["sampler"])
        refreshes = restored["state"].get("teacher_refreshes", 0)
        failed_steps = restored["state"].get("annotation_failed_steps", 0)
        teacher_stale = teacher is not None and "teacher" not in restored["frozen"]
        if teacher_stale and start_step % args.teacher_sync_every:
            print0(f"[resume] {run.checkpoint.name} holds no teacher copy (an older version "
                   "wrote it, or --teacher_sync_every changed): the teacher is re-copied from the "
                   "resumed weights, so this run will not match an uninterrupted one exactly")
        print0(f"[resume] continuing {run_dir} from step {start_step}")
    logger = RunLogger(run_dir, args, dist_info, args.track, resume_step=run.resume_step,
                       step_line=STEP_LINE)
    rollout_params = SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    eval_params = SamplingParams(args.eval_temperature, args.eval_top_p, args.eval_top_k, args.max_new_tokens)
    pad_id, stop_ids = tokenizer.pad_token_id, stop_token_ids(tokenizer, model)

    api = ApiAnnotator(args.annotator_url, args.annotator_model, args.annotator_key_env, args.annotator_timeout,
                       args.annotator_retries, args.annotator_concurrency, args.annotator_max_tokens) \
        if args.annotator == "api" else None
    annotator_name = f"api at {api.url}, model {args.annotator_model}" if api else args.annotator
    last_error = ""  # the annotator's latest failure, for the step lines and the stop
    routes = {"fkl_key": {True: "fkl"}, "rkl_error": {False: "rkl"}, "both": {True: "fkl", False: "rkl"}}[args.route]

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
            note = (f"Colour: each token's routing class (--route {args.route}, --annotator "
                    f"{args.annotator}); hover: the full-vocabulary KL D_t before the --kl_clip "
                    f"bound. From step {args.kl_end} on every token is GRPO: the picture shows the "
                    "last step with routing.")
            write_token_picture(run_dir / "tokens.html", picture, "route", ROUTE_COLOURS,
                                title=f"{run_name}: routing per token", note=note)

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
    print0(f"[trace] {run_name}: {args.num_steps} steps x {args.num_problems} problems x {group} rollouts on "
           f"{world} rank(s), --route {args.route}, --annotator {args.annotator}, --teacher_context "
           f"{args.teacher_context}, lambda_0 {args.lambda_0} held to step {args.kl_hold}, 0 at {args.kl_end}, "
           f"device {dist_info.device}")
    if args.dataset == "toy" and args.annotator == "self" and args.lambda_0 > 0:
        print0("[trace] note: the tiny toy model cannot follow the annotation prompt, so "
               "with --annotator self no annotation succeeds and the run stops after "
               "--annotator_patience steps (0: train on as GRPO); to see TRACE's routing on the "
               "toy use --annotator oracle --teacher_context label+solution (README, TRACE)")
    train_started = time.time()
    stop = GracefulStop()  # SIGINT/SIGTERM from here: end after the current step, checkpointed
    end_step = args.num_steps  # the step reached: earlier after a SIGINT/SIGTERM stop
    for step in range(start_step, args.num_steps):
        step_started = time.time()
        lam = kl_weight(step, args.lambda_0, args.kl_hold, args.kl_end)
        if lam == 0 and teacher is not None:  # the KL window is over: free the frozen copy for good
            del teacher
            teacher = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

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
        rollouts = range(len(responses))

        # ---- 2. verifier rewards and GRPO group advantages A_i
        rewards, grade_counts = grader.grade(texts, [p["answer"] for p in problems for _ in range(group)])
        reward_groups = torch.tensor(rewards).view(problems_per_rank, group)
        sequence_advantages = group_advantages(reward_groups, args.scale_rewards).flatten()
        shown_rows = dict.fromkeys(range(min(args.picture_rollouts, len(responses)) if rank == 0 else 0))

        # ---- 3. annotation (only while lambda_k > 0; by default only the rollouts the route uses): segments
        # -> annotator -> routed token mask under the coverage cap, and the type label
        route_masks = {"fkl": [None] * len(rollouts), "rkl": [None] * len(rollouts)}
        labels = [""] * len(rollouts)
        counts = dict.fromkeys(["annotated", "annotation_ok", "covered"], 0.0)
        if lam > 0:
            wanted = [i for i in rollouts if args.annotate == "all" or (rewards[i] > 0) in routes]
            requests = {}
            for i in wanted:
                text, spans = response_text(tokenizer, responses[i])
                segments = split_segments(text, args.max_segment_chars)
                requests[i] = (Request(problems[i // group]["problem"], text, segments, rewards[i] > 0), spans)
            if args.annotator in ("oracle", "random") and args.dataset == "toy":
                answers = [oracle_annotation(requests[i][0]) for i in wanted]
            elif args.annotator == "self":
                answers, error = self_annotate(engine, tokenizer, [requests[i][0] for i in wanted],
                                               args.annotator_max_tokens, args.annotator_thinking)
                last_error = error or last_error
            elif args.annotator == "api":
                answers = api([requests[i][0] for i in wanted])
                last_error = api.last_error or last_error
            else:  # random off the toy: no oracle to match, a documented share of |y|
                answers = [([], "key step" if requests[i][0].correct else "error") for i in wanted]
            span_rng = random.Random(f"{args.seed}/{step}/{rank}")  # a function of the step: resume-exact
            for i, answer in zip(wanted, answers):
                counts["annotated"] += 1
                if answer is None:
                    continue
                counts["annotation_ok"] += 1
                request, spans = requests[i]
                chosen, labels[i] = answer
                mask = capped_mask(chosen, segment_tokens(spans, request.segments), len(responses[i]), args.alpha)
                if args.annotator == "random":  # same size as the oracle's (toy) or --random_coverage of |y|
                    size = int(mask.sum()) if args.dataset == "toy" else min(
                        math.floor(args.alpha * len(responses[i]) + 1e-9),
                        round(args.random_coverage * len(responses[i])))
                    valid = [t for t, token in enumerate(responses[i]) if token not in stop_ids]
                    mask = random_mask(len(responses[i]), size, span_rng, valid)
                counts["covered"] += float(mask.sum()) / len(responses[i])
                if mask.any() and request.correct in routes:  # --annotate all: the other class is not trained
                    route_masks[routes[request.correct]][i] = mask
            # failed annotations leave their rollouts to GRPO: say so each step, and stop when none
            # succeeds for --annotator_patience steps (every rank decides alike: global counts)
            asked, succeeded = all_reduce_sum(
                torch.tensor([counts["annotated"], counts["annotation_ok"]])).tolist()
            if asked:
                failed_steps = failed_steps + 1 if succeeded == 0 else 0
            said = f"--annotator {annotator_name}; last error: {last_error or 'unknown'}"
            if succeeded < asked:
                print0(f"[trace] step {step + 1}: {asked - succeeded:g} of {asked:g} annotations "
                       f"failed ({said})")
            if args.annotator_patience and failed_steps >= args.annotator_patience:
                raise UserError(f"no annotation succeeded in {failed_steps} consecutive steps "
                                f"({said}); stopped before the update of step {step + 1}, as "
                                "TRACE would train plain GRPO. Fix the annotator (then --resume "
                                "from the last checkpoint), or pass --annotator_patience 0 to "
                                "train on regardless.")

        # ---- 4. teacher refresh (frozen copy) and teacher prompts of the routed rollouts: the problem plus
        # the private context (type label [paper], + reference solution [ours]); never the span positions
        routed = [i for i in rollouts if route_masks["fkl"][i] is not None or route_masks["rkl"][i] is not None]
        refresh = step % args.teacher_sync_every == 0 or teacher_stale
        if lam > 0 and teacher is not None and refresh:
            teacher_stale = False
            copy_weights(teacher, model)
            refreshes += 1
        teacher_prompts = {i: build_prompt(tokenizer, problems[i // group]["problem"],
                                           teacher_context(args.teacher_context, labels[i], rewards[i] > 0,
                                                           problems[i // group]), args.enable_thinking)
                           for i in routed}
        teacher_model = teacher if teacher is not None else model

        # ---- 5. behaviour log-probs, needed separately only when a batch gets several updates
        student_lengths = [len(student_prompts[i]) + len(responses[i]) for i in rollouts]
        budget = (args.micro_batch_size, args.micro_batch_tokens)  # sequences and padded tokens per forward;
        # same_count: every rank runs as many micro-batches (FSDP2's collectives pair up across ranks)
        behaviour_logprobs = [None] * len(rollouts)
        if args.num_minibatches > 1:
            with torch.no_grad():
                for batch in micro_batches(rollouts, student_lengths, *budget, same_count=True):
                    hidden, targets, mask = response_hidden(model, [student_prompts[i] for i in batch],
                                                            [responses[i] for i in batch], pad_id)
                    logprobs, _ = token_logprob_entropy(output_head(model), hidden, targets, mask,
                                                        args.logprob_chunk_size, temperature=args.temperature)
                    for i, row, row_mask in zip(batch, logprobs, mask):
                        behaviour_logprobs[i] = row[row_mask]

        # ---- 6. loss: GRPO on N, faded GRPO + lambda_k * bounded KL on S, global token-mean
        model.train()
        sums = dict.fromkeys(["loss", "kl_loss", "entropy", "clipped", "fkl_tokens", "rkl_tokens", "kl_raw",
                              "kl_bounded", "kl_over_clip", "gap_key", "gap_error", "tis"], 0.0)
        fade = 1.0 - lam / args.lambda_0 if args.lambda_0 > 0 else 1.0
        kl_rows = {}  # rollout -> per-token D_t before the bound (picture)
        per_minibatch = len(responses) // args.num_minibatches
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            minibatch_tokens = all_reduce_sum(sum(len(responses[i]) for i in owned)).item()
            minibatch_sequences = all_reduce_sum(len(owned)).item()
            for batch in micro_batches(owned, student_lengths, *budget, same_count=True):
                # the teacher's no-grad forward on the routed rows of this micro-batch (every rank runs it
                # when any rank has routed rows: FSDP all-gathers need every rank)
                rows = [row for row, i in enumerate(batch) if i in teacher_prompts]
                teacher_hidden = None
                if lam > 0 and all_reduce_sum(float(len(rows))).item() > 0:
                    scored = [batch[row] for row in rows] or batch[:1]
                    teacher_hidden = teacher_forward(teacher_model, [teacher_prompts.get(i, student_prompts[i])
                                                                     for i in scored],
                                                     [responses[i] for i in scored], pad_id)
                hidden, targets, mask = response_hidden(model, [student_prompts[i] for i in batch],
                                                        [responses[i] for i in batch], pad_id)
                head = output_head(model)
                logprobs, entropy = token_logprob_entropy(head, hidden, targets, mask, args.logprob_chunk_size,
                                                          temperature=args.temperature)
                # the behaviour policy (the weights that sampled the batch) gives the ratio's denominator
                old_logprobs = (pad_sequence([behaviour_logprobs[i] for i in batch], batch_first=True)
                                if args.num_minibatches > 1 else logprobs.detach())
                advantages = sequence_advantages[batch].to(mask.device)[:, None].expand(mask.shape)
                masks = {}
                for name in ("fkl", "rkl"):
                    rows_mask = [route_masks[name][i] if route_masks[name][i] is not None else
                                 torch.zeros(len(responses[i]), dtype=torch.bool) for i in batch]
                    padded = pad_sequence(rows_mask, batch_first=True).to(mask.device)
                    masks[name] = torch.nn.functional.pad(padded, (0, mask.shape[1] - padded.shape[1])) & mask
                span = masks["fkl"] | masks["rkl"]
                weights = torch.where(span, fade, 1.0) * mask
                tis = (tis_weights(old_logprobs, padded_rows([sampler_logprobs[i] for i in batch], mask), mask,
                                   args.tis_cap) if args.tis_cap > 0 else None)
                loss = policy_loss(logprobs, old_logprobs, advantages, weights, minibatch_tokens,
                                   args.clip_low, args.clip_high, tis)
                if tis is not None:
                    sums["tis"] += tis[mask].sum()
                kl_loss = torch.zeros((), device=mask.device)
                if teacher_hidden is not None and rows:
                    sub = torch.tensor(rows, device=mask.device)
                    width = teacher_hidden.shape[1]
                    student_sub = hidden[sub][:, :width]
                    d_raw = torch.zeros(len(rows), width, device=mask.device)
                    for name, direction in (("fkl", "forward"), ("rkl", "reverse")):
                        routed_here = masks[name][sub][:, :width]
                        if routed_here.any():
                            d_raw = d_raw + routed_kl(head, student_sub, output_head(teacher_model), teacher_hidden,
                                                      routed_here, direction, args.logprob_chunk_size)
                    span_sub = span[sub][:, :width]
                    d = bound_kl(d_raw, args.kl_clip, args.kl_clip_mode)
                    if args.kl_norm == "token":
                        kl_loss = lam * d[span_sub].sum() / minibatch_tokens
                    else:  # span-mean scaled by |S|/|y| = sum_S D / |y|, mean over the global batch's responses
                        lengths = torch.tensor([len(responses[batch[row]]) for row in rows], device=d.device)
                        kl_loss = lam * (torch.where(span_sub, d, 0.0).sum(1) / lengths).sum() / minibatch_sequences
                    with torch.no_grad():  # is the teacher surer than the student of the sampled tokens?
                        teacher_logp, _ = token_logprob_entropy(output_head(teacher_model), teacher_hidden,
                                                                targets[sub][:, :width], span_sub,
                                                                args.logprob_chunk_size, temperature=args.temperature)
                        gap = teacher_logp - logprobs.detach()[sub][:, :width]
                        sums["gap_key"] += gap[masks["fkl"][sub][:, :width]].sum()
                        sums["gap_error"] += gap[masks["rkl"][sub][:, :width]].sum()
                    sums["kl_raw"] += d_raw.detach()[span_sub].sum()
                    sums["kl_bounded"] += d.detach()[span_sub].sum()
                    sums["kl_over_clip"] += (d_raw.detach()[span_sub] > args.kl_clip).sum() if args.kl_clip else 0.0
                    for row, i in zip(rows, (batch[r] for r in rows)):
                        kl_rows[i] = d_raw.detach()[rows.index(row)].cpu()
                ((loss + kl_loss) * world).backward()  # FSDP averages gradients over ranks; the loss wants their sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[mask]
                sums["loss"] += loss.detach() + kl_loss.detach()  # tensors: no device sync inside the loop
                sums["kl_loss"] += kl_loss.detach()
                sums["entropy"] += entropy.detach()[mask].sum()
                sums["clipped"] += ((ratio < 1 - args.clip_low) | (ratio > 1 + args.clip_high)).sum()
                sums["fkl_tokens"] += masks["fkl"].sum()
                sums["rkl_tokens"] += masks["rkl"].sum()
                for row, i in enumerate(batch):  # the token picture: routing class, D_t on hover
                    if i in shown_rows:
                        route = masks["fkl"][row].float() - masks["rkl"][row].float()
                        shown_rows[i] = route[mask[row]].cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        engine.update_weights(model)

        # ---- 7. metrics, token picture, evaluation, checkpoint
        if lam > 0 or not picture or not kl_steps:  # after kl_end the picture keeps the last routed step
            picture = [picture_row(tokenizer, problems[i // group], responses[i], rewards[i], shown_rows[i],
                                   kl_rows.get(i, torch.zeros(len(responses[i]))), labels[i] or "-", step + 1)
                       for i in shown_rows]
        sums.update(counts, reward=sum(rewards), sequences=len(rewards), tokens=sum(len(r) for r in responses),
                    careful=sum(writes_work(text) for text in texts),
                    truncated=sum(1 for r in responses if not r or r[-1] not in stop_ids),
                    zero_adv_groups=int((reward_groups.max(1).values == reward_groups.min(1).values).sum()),
                    no_answer=grade_counts["no_answer"], grader_timeouts=grade_counts["timeout"])
        totals = all_reduce_sum(sums)
        tokens, sequences_global = totals["tokens"], totals["sequences"]
        routed_tokens = totals["fkl_tokens"] + totals["rkl_tokens"]
        step_seconds = time.time() - step_started
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        nan = float("nan")
        metrics = {
            "reward": totals["reward"] / sequences_global,
            "response_len": tokens / sequences_global,
            "loss": totals["loss"] / args.num_minibatches,
            "kl_loss": totals["kl_loss"] / args.num_minibatches,
            "entropy": totals["entropy"] / tokens,
            "grad_norm": float(grad_norm),
            "lambda_k": lam,
            "annotated": totals["annotated"],
            "annotation_success": totals["annotation_ok"] / totals["annotated"] if totals["annotated"] else nan,
            "annotation_failed": totals["annotated"] - totals["annotation_ok"],
            "coverage": totals["covered"] / totals["annotated"] if totals["annotated"] else nan,
            "share_fkl": totals["fkl_tokens"] / tokens,
            "share_rkl": totals["rkl_tokens"] / tokens,
            "share_grpo": 1 - routed_tokens / tokens,
            "kl_routed": totals["kl_raw"] / routed_tokens if routed_tokens else nan,
            "kl_routed_bounded": totals["kl_bounded"] / routed_tokens if routed_tokens else nan,
            "kl_over_clip_frac": totals["kl_over_clip"] / routed_tokens if routed_tokens else nan,
            "logp_gap_key": totals["gap_key"] / totals["fkl_tokens"] if totals["fkl_tokens"] else nan,
            "logp_gap_error": totals["gap_error"] / totals["rkl_tokens"] if totals["rkl_tokens"] else nan,
            "teacher_refreshes": refreshes,
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
            # the teacher copy goes along when the next step uses it without refreshing it first
            keep_teacher = teacher is not None and (step + 1) % args.teacher_sync_every and \
                kl_weight(step + 1, args.lambda_0, args.kl_hold, args.kl_end) > 0
            save_checkpoint(run_dir, step + 1, model, tokenizer, optimizer,
                            {"sampler": sampler.state_dict(), "teacher_refreshes": refreshes,
                             "annotation_failed_steps": failed_steps}, dist_info,
                            frozen={"teacher": teacher} if keep_teacher else None)
        if stopping:
            end_step = step + 1
            break

    # ---- summary ---------------------------------------------------------------------------------
    draw_picture()
    minutes = (time.time() - train_started) / 60
    ended = "done" if end_step == args.num_steps else "stopped"
    summary = f"[trace] {ended}: steps {start_step}->{end_step} in {minutes:.1f} min; runs dir {run_dir}"
    if "first" in history and "last" in history:
        key = f"eval/avg@{eval_k}"
        summary += f"; {key} {history['first'][key]:.3f} -> {history['last'][key]:.3f}"
    print0(summary)
    print0(f"[trace] evaluate its final weights: {eval_command(args, run_dir)}")
    logger.close()
    grader.close()
    return history


@torch.no_grad()
def teacher_forward(teacher, prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> torch.Tensor:
    """The teacher's final hidden states on the student's tokens after its own prompts ([B, R, H], no grad).
    The one place the teacher runs (tests count its calls)."""
    hidden, _, _ = response_hidden(teacher, prompts, responses, pad_id)
    return hidden


if __name__ == "__main__":
    run_main(main)
