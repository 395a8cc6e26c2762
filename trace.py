"""TRACE: token-routed self on-policy alignment, distilling on critical spans (arXiv 2605.10194)

Idea. Self-distillation over a whole response spends its gradient on redundant tokens and leaks
the privileged context everywhere. TRACE has an annotator mark each rollout's few critical spans
(key steps of a correct one, the first error of an incorrect one) with a coarse type label, distils
a self-teacher (the model shown the label privately) into the student only there, and trains every
other token with GRPO; the KL weight anneals to zero after a short window.

Equations (sg = stop-gradient; S = a rollout's routed tokens, N = the others):
    A_i = (R_i - mean_G R) / (std_G R + 1e-6)                            GRPO group advantage
    l_t = -min(rho_t A_i, clip(rho_t, 1-eps_low, 1+eps_high) A_i)        clip-higher surrogate
    S   = key spans of correct rollouts (--route fkl_key: D_t = KL(pi_T || pi_S)), error spans of
          incorrect ones (rkl_error: D_t = KL(pi_S || pi_T)), or both; |S| <= alpha |y|
    D'_t = D_t min(1, c / sg[D_t])   (--kl_clip c; --kl_clip_mode clamp: min(D_t, c); c = 0: D_t)
    L   = [sum_N l_t + (1 - lambda_k/lambda_0) sum_S l_t + lambda_k sum_S D'_t] / N_tokens
          (--kl_norm span: the KL term is sum_i sum_{S_i} D'_t / |y_i| / N_sequences)
    lambda_k = lambda_0 for k < kl_hold, linear to 0 at kl_end; then no annotation, no teacher.
D_t compares the models' own (T = 1) distributions over the full vocabulary; rho_t and the teacher
log-prob gap use softmax(logits / --temperature), the rollouts' distribution (verl, TRL).
[paper]: spans + type label, key/error routing, alpha 0.25, the teacher = the same model with the
label as a private prefix (never the spans), fkl_key for Qwen3-8B / rkl_error for Qwen3-1.7B, clip-
higher, self and API annotators, eval T 0.6, top-p 0.95, top-k 20. [2nd] (a secondary write-up):
the loss, lambda_0 0.5, the schedule 10 -> 40, a frozen teacher copy refreshed every 10 steps, the
span norm, lines as segments, a "pointwise KL clip 0.05" of unknown form (rescale keeps the gradient
that lifts under-allocated teacher tokens, a clamp zeroes it; README, TRACE). [ours]: the rest.
Simplification, safe: the api annotator asks one request at a time (the step waits for every answer
either way). The toy's lines are checkable, so `oracle` knows the exact spans; the tiny model cannot
annotate (`self`). The name shadows the standard library's `trace`, which nothing here imports.
    python trace.py --annotator oracle --teacher_context label+solution  # toy, CPU (README, TRACE)
Paper [paper; steps, batch, lengths ours] (Qwen3-8B, one 8-GPU node; add --tis_cap 2 with vLLM):
    torchrun --nproc_per_node 8 trace.py --model Qwen3-8B --route fkl_key --annotator api \\
        --annotator_url https://host/v1 --annotator_model <name> --annotator_key_env MY_KEY \\
        --dataset openthoughts-math --eval_dataset math500 --num_steps 400 --num_problems 32 \\
        --num_generations 8 --lr 1e-6 --max_new_tokens 16384 --micro_batch_size 2 \\
        --eval_temperature 0.6 --eval_top_p 0.95 --eval_top_k 20 --eval_every 20 --save_every 20
    python trace.py --eval_only --model runs/<run>/checkpoints/step_000400 \\
        --eval_dataset math500,aime24,aime25,amc23,gpqa --eval_temperature 0.6 --eval_top_k 20
"""

import gc
import json
import math
import os
import random
import re
import urllib.request
from collections import namedtuple
from dataclasses import dataclass
from typing import Literal, Optional

import torch

import common
from common import option

# tokens.html: routing classes are categories [ours]; the keys are the values of the routing [N, R]
ROUTE_COLOURS = {1.0: ("fkl: forward KL (key span of a correct rollout)", "#66c2a5"),
                 -1.0: ("rkl: reverse KL (error span of an incorrect rollout)", "#fc8d62"),
                 0.0: ("GRPO only (not routed)", "transparent")}
# which rollouts each --route distils (correct? -> its ROUTE_COLOURS value)
ROUTES = {"fkl_key": {True: 1.0}, "rkl_error": {False: -1.0}, "both": {True: 1.0, False: -1.0}}
# Coarse type labels [ours: the paper names "a coarse type label"]; other text is kept, cut to 40.
LABELS = ("key step", "answer", "arithmetic", "logic", "setup", "check", "other")
ANNOTATOR_PROMPT = (  # [ours]; segments are numbered from 1
    "You review a student's solution to a math problem. Its final answer is {verdict}.\n\n"
    "Problem: {problem}\n\nSolution, one numbered segment per line:\n{segments}\n\n{task}\n"
    'Reply with one JSON object only, for example {{"spans": [2], "label": "arithmetic"}}, '
    'where "spans" lists segment numbers and "label" is one of: {labels}.')
ANNOTATOR_TASK = {True: "Name the key segments: the one or few steps the correct answer rests on.",
                  False: "Name the segments where the first error is made."}
# The teacher's private context: the label [paper], or the solution too [ours]; never the spans.
FEEDBACK = dict(zip((True, False), common.TOY_FEEDBACK_LINES))  # the toy's: "... was (in)correct."
TEACHER_CONTEXT = {"label": "{feedback}\nType: {label}.", "label+solution":
                   common.TOY_CONTEXT_HEADER + "{solution}\n\n{feedback}\nType: {label}."}
EVAL_PROTOCOL: dict = {}  # the paper's k per benchmark is not in our sources: common.DATASETS' k
STEP_LINE = ("reward", "lambda_k", "kl_routed", "coverage", "step_seconds")  # all: metrics.jsonl
COUNTS = ("annotated", "annotation_ok", "covered")  # annotation counts per rank, summed
SAFE_ON_RESUME = {"annotator_url", "annotator_key_env", "annotator_timeout", "annotator_retries",
                  "annotator_concurrency", "annotator_patience"}  # a --resume may change these


@dataclass
class Args(common.RunOptions):
    route: Literal["fkl_key", "rkl_error", "both"] = option(
        "fkl_key", "fkl_key: forward KL on key spans of correct rollouts [paper, Qwen3-8B]; "
                   "rkl_error: reverse KL on incorrect ones' error spans [paper, Qwen3-1.7B]; both")
    annotator: Literal["self", "api", "oracle", "random"] = option(
        "self", "self: the policy, greedy [paper]; api: an OpenAI-compatible endpoint [paper]; "
                "oracle: toy only [ours]; random: length-matched random spans [ours]")
    annotate: Literal["routed", "all"] = option(
        "routed", "rollouts annotated: the class the route trains [ours], or all [paper]")
    teacher_context: Literal["label", "label+solution"] = option(
        "label", "the teacher's private context: the label [paper], + the solution [ours]")
    lambda_0: float = option(0.5, "KL weight during the hold [2nd]; 0 = GRPO (no annotation)")
    kl_hold: int = option(10, "steps 0..kl_hold-1 use lambda_0 [2nd]")
    kl_end: int = option(40, "lambda reaches 0 at this step; from here on pure GRPO [2nd]")
    alpha: float = option(0.25, "coverage cap: routed tokens <= alpha * |y| per rollout [paper]")
    kl_clip: float = option(0.05, "bound on each routed token's KL [2nd; form ours]; 0 = off")
    kl_clip_mode: Literal["rescale", "clamp"] = option(
        "rescale", "rescale: D * min(1, c/sg[D]), gradient kept [ours]; clamp: min(D, c)")
    kl_norm: Literal["token", "span"] = option(
        "token", "token: global token-mean like GRPO; span: sum_S D / |y| per response [2nd]")
    teacher_sync_every: int = option(10, "refresh the teacher copy every N steps [2nd]; 1 = live")
    max_segment_chars: int = option(200, "a longer response line is split into segments [ours]")
    random_coverage: float = option(0.1, "--annotator random off the toy: share of |y| [ours]")
    annotator_max_tokens: int = option(64, "tokens of the annotator's JSON answer")
    annotator_thinking: bool = option(False, "self: the Qwen3 template's thinking switch")
    annotator_url: str = option("", "api: an OpenAI-compatible .../v1 or its /chat/completions")
    annotator_model: str = option("", "api: the model name sent to the endpoint")
    annotator_key_env: str = option("", "api: environment variable holding the key (never logged)")
    annotator_timeout: float = option(10.0, "api: seconds per request attempt")
    annotator_retries: int = option(1, "api: retries of a failed request (no backoff)")
    annotator_patience: int = option(3, "stop after this many steps with no annotation; 0 = never")
    annotator_concurrency: int = option(8, "api: ignored (one request at a time), for old commands")
    # the GRPO core [paper setting via verl]
    num_generations: int = option(8, "rollouts per problem G [ours: 8]")
    clip_low: float = option(0.2, "PPO ratio clip eps_low [paper]")
    clip_high: float = option(0.28, "PPO ratio clip eps_high, DAPO clip-higher [paper]")
    scale_rewards: bool = option(True, "divide advantages by the group std (false = Dr.GRPO)")
    num_minibatches: int = option(1, "optimizer steps per batch; 1 = on-policy, rho = 1 [ours]")


RULES = {  # valid ranges of TRACE's own options; the shared ones: common.ARG_RULES
    "num_generations": ((lambda g: g >= 2), ">= 2 (GRPO's baseline is the group mean of at "
                                            "least 2 rollouts)"),
    **dict.fromkeys(("lambda_0", "kl_hold", "kl_end", "kl_clip", "annotator_retries",
                     "annotator_patience", "picture_rollouts"), common.at_least(0)),
    **dict.fromkeys(("teacher_sync_every", "annotator_max_tokens", "annotator_concurrency"),
                    common.at_least(1)),
    "alpha": common.between(0, 1), "random_coverage": common.between(0, 1),
    "max_segment_chars": common.at_least(8), "annotator_timeout": common.above(0)}


# ---- the method's math: small pure functions ------------------------------------------------
def group_advantages(rewards: torch.Tensor, scale_rewards: bool = True) -> torch.Tensor:
    """A_i for rewards [problems, G]: group-centred, over the group's (sample) std + 1e-6."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-6) if scale_rewards else centred


def kl_weight(step: int, lambda_0: float = 0.5, kl_hold: int = 10, kl_end: int = 40) -> float:
    """lambda_k: lambda_0 for step < kl_hold, then linear to 0 at kl_end (0-based steps)."""
    if step < kl_hold:
        return lambda_0
    return lambda_0 * (kl_end - step) / (kl_end - kl_hold) if step < kl_end else 0.0


def policy_loss(logprobs, old_logprobs, advantages, weights, num_tokens, clip_low=0.2,
                clip_high=0.28, tis=None):
    """Clipped surrogate x weight (N: 1, S: 1 - lambda_k/lambda_0, padding: 0) x tis / N_tokens."""
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * advantages,
                              ratio.clamp(1 - clip_low, 1 + clip_high) * advantages)
    surrogate = surrogate if tis is None else surrogate * tis
    return -torch.where(weights > 0, weights * surrogate, 0.0).sum() / num_tokens


def bound_kl(d: torch.Tensor, kl_clip: float = 0.05, mode: str = "rescale") -> torch.Tensor:
    """The --kl_clip bound per token: rescale D * min(1, c / sg[D]) (value min(D, c), gradient
    direction kept); clamp min(D, c) (no gradient above c); c = 0: D."""
    if kl_clip <= 0:
        return d
    if mode == "clamp":
        return d.clamp(max=kl_clip)
    return d * (kl_clip / d.detach().clamp_min(kl_clip))  # = min(1, c / sg[D]) for D >= 0


def span_kl(args, weight, student, teacher, targets, span, lengths, num_tokens, num_sequences):
    """weight x the bounded KL (--kl_norm) on a micro-batch's routed rows (`student`: head, hidden,
    log-probs; `span`: +1 KL(pi_T || pi_S), -1 KL(pi_S || pi_T); no gradient to the teacher) and,
    per token without gradient, D_t, D'_t and the teacher-student log-prob gap of y_t."""
    (head, *student), (teacher_head, teacher_hidden) = student, teacher
    cut = teacher_hidden.shape[1]  # the routed rows' longest response
    hidden, logprobs, targets, span = (x[:, :cut] for x in (*student, targets, span))
    d_raw = torch.zeros(span.shape, device=span.device)
    for sign, direction in ((1.0, "forward"), (-1.0, "reverse")):
        if (span == sign).any():
            d_raw = d_raw + common.token_kl(head, hidden, torch.no_grad()(teacher_head),
                                            teacher_hidden.detach(), span == sign, direction,
                                            args.logprob_chunk_size)
    d = bound_kl(d_raw, args.kl_clip, args.kl_clip_mode)
    if args.kl_norm == "token":
        term = weight * d[span != 0].sum() / num_tokens
    else:
        lengths = torch.tensor(lengths, device=span.device)
        term = weight * (torch.where(span != 0, d, 0.0).sum(1) / lengths).sum() / num_sequences
    with torch.no_grad():
        teacher_logprobs, _ = common.token_logprob_entropy(
            teacher_head, teacher_hidden, targets, span != 0, args.logprob_chunk_size,
            args.temperature)
    return term, d_raw.detach(), d.detach(), teacher_logprobs - logprobs


# ---- annotation: response lines -> numbered segments -> the annotator's choice -> tokens -----
def response_text(tokenizer, response: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character span per token), special tokens blanked (offsets kept) for the segments."""
    text, spans = common.response_token_spans(tokenizer, response)
    special, chars = set(tokenizer.all_special_ids), list(text)
    for token, (start, end) in zip(response, spans):
        if token in special:
            chars[start:end] = " " * (end - start)
    return "".join(chars), spans


def split_segments(text: str, max_chars: int = 200) -> list[tuple[int, int]]:
    """Character spans of the numbered segments: the non-blank lines, trimmed; a longer line than
    `max_chars` is cut into pieces of at most `max_chars`, after a piece's last space if any."""
    segments = []
    for line in re.finditer(r"\S(?:[^\n]*\S)?", text):  # a line from its first to last non-space
        start, end = line.span()
        while end - start > max_chars:
            cut = text.rfind(" ", start + 1, start + max_chars + 1)
            cut = cut if cut > start else start + max_chars
            segments.append((start, start + len(text[start:cut].rstrip())))
            start = cut + len(text[cut:end]) - len(text[cut:end].lstrip())
        segments.append((start, end))
    return segments


def segment_tokens(token_spans: list, segments: list) -> list[list[int]]:
    """Per segment, the tokens whose character span overlaps it (an empty one: where it stands)."""
    return [[i for i, (a, b) in enumerate(token_spans)
             if max(a, start) < min(b, end) or (a == b and start <= a < end)]
            for start, end in segments]


def capped_mask(chosen: list[int], seg_tokens: list, length: int, alpha=0.25) -> torch.Tensor:
    """Bool [length] of the routed tokens: the chosen segments' tokens in the annotator's order, up
    to floor(alpha * length) in all; the segment crossing the cap keeps its first tokens [ours]."""
    mask, budget = torch.zeros(length, dtype=torch.bool), math.floor(alpha * length + 1e-9)
    for segment in chosen:
        new = [t for t in seg_tokens[segment] if not mask[t]]
        take = new[:budget - int(mask.sum())]
        mask[take] = True
        if len(take) < len(new):
            break
    return mask


def random_mask(length: int, size: int, rng: random.Random, valid=None) -> torch.Tensor:
    """Bool [length]: `size` contiguous positions among `valid` (default all), uniform start."""
    valid = list(range(length)) if valid is None else valid
    mask = torch.zeros(length, dtype=torch.bool)
    if size > 0 and valid:
        start = rng.randrange(max(len(valid) - size, 0) + 1)
        mask[valid[start:start + size]] = True
    return mask


Request = namedtuple("Request", "problem text segments correct")  # what an annotator reads


def annotator_prompt(request: Request) -> str:
    numbered = "\n".join(f"[{k + 1}] {request.text[a:b]}"
                         for k, (a, b) in enumerate(request.segments))
    return ANNOTATOR_PROMPT.format(verdict="correct" if request.correct else "incorrect",
                                   problem=request.problem, segments=numbered or "(empty)",
                                   task=ANNOTATOR_TASK[request.correct], labels=", ".join(LABELS))


def parse_annotation(answer: str, num_segments: int) -> Optional[tuple[list[int], str]]:
    """The first JSON object in `answer` if its "spans" are ints in 1..num_segments -> (0-based,
    unique; label: one of LABELS in any case, else free text cut to 40, else "other"), else None."""
    decoder, position = json.JSONDecoder(), answer.find("{")
    while position != -1:
        try:
            value, _ = decoder.raw_decode(answer, position)
        except ValueError:
            position = answer.find("{", position + 1)
            continue
        spans = value.get("spans") if isinstance(value, dict) else None
        if not isinstance(spans, list) or \
                not all(type(s) is int and 1 <= s <= num_segments for s in spans):
            return None
        label = " ".join(value["label"].split())[:40] if isinstance(value.get("label"), str) else ""
        label = next((known for known in LABELS if known == label.lower()), label) or "other"
        return list(dict.fromkeys(s - 1 for s in spans)), label
    return None


def oracle_annotation(request: Request) -> tuple[list[int], str]:
    """The toy's exact spans (`common.parse_toy_steps`): a correct response's last step line (else
    its answer); an incorrect one's first wrong line, labelled by kind (step: logic|arithmetic)."""
    lines = common.parse_toy_steps(request.problem, request.text)
    if request.correct:
        chosen = ([line for line in lines if line["kind"] == "step"]
                  or [line for line in lines if line["kind"] == "answer"])[-1:]
        label = "key step" if chosen and chosen[0]["kind"] == "step" else "answer"
    else:
        chosen = [line for line in lines if not line["correct"]][:1]
        label = chosen[0]["kind"] if chosen else "other"
        if label == "step":
            a, op, b, result = re.fullmatch(r"(\d+)([+\-*])(\d+)=(-?\d+)",
                                            chosen[0]["text"].strip()).groups()
            a, b, result = int(a), int(b), int(result)
            label = "logic" if result == {"+": a + b, "-": a - b, "*": a * b}[op] else "arithmetic"
    segments = [k for k, (a, b) in enumerate(request.segments) for line in chosen
                if max(a, line["start"]) < min(b, line["end"])]
    return list(dict.fromkeys(segments)), label


def self_annotate(run, requests: list[Request]) -> list[str]:
    """--annotator self: the policy answers greedily; each rank generates as many (FSDP), padded."""
    args, tokenizer = run.args, run.tokenizer
    prompts = [tokenizer(tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True,
        enable_thinking=args.annotator_thinking), add_special_tokens=False).input_ids
        for content in [annotator_prompt(r) for r in requests] or ["{}"]]
    count = int(common.all_gather_cat(torch.tensor([len(requests)])).max())
    if count == 0:
        return []
    answers = run.engine.generate(prompts + prompts[:1] * (count - len(prompts)),
                                  common.SamplingParams(0.0, 1.0, 0, args.annotator_max_tokens),
                                  desc="annotate")
    return tokenizer.batch_decode(answers[:len(requests)], skip_special_tokens=True)


def api_url(args) -> str:
    return args.annotator_url.rstrip("/").removesuffix("/chat/completions") + "/chat/completions"


def ask_api(args, requests: list[Request]) -> tuple[list, str]:
    """--annotator api: one POST per request, in turn, retried --annotator_retries times; once a
    request timed out on every attempt, the step asks no more. -> (answer or None each, error)"""
    key = os.environ.get(args.annotator_key_env, "")  # none without --annotator_key_env
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {key}"} if key else {})}
    answers, error = [None] * len(requests), ""
    for k, request in enumerate(requests):
        body = json.dumps({"model": args.annotator_model, "temperature": 0.0,
                           "max_tokens": args.annotator_max_tokens,
                           "messages": [{"role": "user", "content": annotator_prompt(request)}]})
        post, timeouts = urllib.request.Request(api_url(args), body.encode(), headers), 0
        for _ in range(args.annotator_retries + 1):
            try:
                with urllib.request.urlopen(post, timeout=args.annotator_timeout) as reply:
                    answers[k] = json.loads(reply.read())["choices"][0]["message"]["content"] or ""
                break
            except (OSError, ValueError, LookupError, TypeError) as failure:  # HTTP, net, format
                error = f"{type(failure).__name__}: {failure}"
                timeouts += isinstance(getattr(failure, "reason", failure), TimeoutError)
        if timeouts > args.annotator_retries:  # the endpoint hangs: do not wait on it per request
            break
    return answers, error


def teacher_context(mode: str, label: str, correct: bool, problem: dict) -> str:
    """The teacher's private context c: label, correctness (+ the solution, else the answer)."""
    solution = problem.get("solution") or f"\\boxed{{{problem['answer']}}}"
    return TEACHER_CONTEXT[mode].format(label=label, solution=solution, feedback=FEEDBACK[correct])


def annotate(run, batch, step: int, failures: dict) -> tuple[torch.Tensor, list, dict, dict]:
    """The rollouts --annotate names -> routing [N, R] (+1 forward KL, -1 reverse KL, 0 GRPO) under
    the cap, labels, the teacher's prompt per routed rollout, this rank's counts. A failed one is
    GRPO's; `failures` (failed steps in a row, last error) stops the run at --annotator_patience."""
    args, responses, signs = run.args, batch.responses, ROUTES[run.args.route]
    problems = [batch.problems[i // args.num_generations] for i in range(len(responses))]
    wanted = [i for i, r in enumerate(batch.rewards) if args.annotate == "all" or (r > 0) in signs]
    texts = [response_text(run.tokenizer, responses[i]) for i in wanted]
    requests = [Request(problems[i]["problem"], text, split_segments(text, args.max_segment_chars),
                        batch.rewards[i] > 0) for i, (text, _) in zip(wanted, texts)]
    error = ""
    if args.annotator in ("oracle", "random") and args.dataset == "toy":
        answers = [oracle_annotation(r) for r in requests]
    elif args.annotator in ("self", "api"):
        replies, error = ask_api(args, requests) if args.annotator == "api" else \
            (self_annotate(run, requests), "")
        answers = [None if text is None else parse_annotation(text, len(r.segments))
                   for text, r in zip(replies, requests)]
        for text in [t for t, a in zip(replies, answers) if t is not None and a is None][-1:]:
            error = f"an answer is not the JSON object asked for: {text[:80]!r}"
    else:  # random off the toy: no oracle to match, --random_coverage of |y|
        answers = [([], "key step" if r.correct else "error") for r in requests]
    span_rng = random.Random(f"{args.seed}/{step}/{run.dist.rank}")  # a function of the step
    route = torch.zeros(len(responses), max([1] + [len(r) for r in responses]))
    labels, teacher_prompts, covered = [""] * len(responses), {}, 0.0
    for i, request, (_, spans), answer in zip(wanted, requests, texts, answers):
        if answer is None:
            continue
        chosen, labels[i] = answer
        length = len(responses[i])
        mask = capped_mask(chosen, segment_tokens(spans, request.segments), length, args.alpha)
        if args.annotator == "random":  # as many tokens as the oracle (toy), else a share of |y|
            size = int(mask.sum()) if args.dataset == "toy" else min(
                math.floor(args.alpha * length + 1e-9), round(args.random_coverage * length))
            valid = [t for t, token in enumerate(responses[i]) if token not in run.stop_ids]
            mask = random_mask(length, size, span_rng, valid)
        covered += float(mask.sum()) / length
        if request.correct in signs and mask.any():  # --annotate all: the other class is counted
            route[i, :length] = torch.where(mask, signs[request.correct], 0.0)
            context = teacher_context(args.teacher_context, labels[i], request.correct, problems[i])
            teacher_prompts[i] = common.build_prompt(run.tokenizer, problems[i]["problem"],
                                                     context, args.enable_thinking)
    ok = float(sum(answer is not None for answer in answers))
    counts = dict(zip(COUNTS, (float(len(answers)), ok, covered)))
    asked, succeeded = common.all_reduce_sum(torch.tensor([len(answers), ok])).tolist()
    failures["error"] = error or failures["error"]
    failures["steps"] = 0 if succeeded else failures["steps"] + (asked > 0)  # in a row, in vain
    name = f"api at {api_url(args)}, model {args.annotator_model}" if args.annotator == "api" \
        else args.annotator
    said = f"--annotator {name}; last error: {failures['error'] or 'unknown'}"
    if succeeded < asked:
        common.print0(f"[trace] step {step + 1}: {asked - succeeded:g} of {asked:g} annotations "
                      f"failed ({said})")
    if args.annotator_patience and failures["steps"] >= args.annotator_patience:
        raise common.UserError(
            f"no annotation succeeded in {failures['steps']} consecutive steps ({said}); stopped "
            f"before the update of step {step + 1}, as TRACE would train plain GRPO. Fix the "
            "annotator (then --resume from the last checkpoint), or pass --annotator_patience 0 "
            "to train on regardless.")
    return route, labels, teacher_prompts, counts


def picture(run, batch, step: int, route, kl, labels: list[str]) -> Optional[dict]:
    """tokens.html: each token's routing class (ROUTE_COLOURS), D_t before the bound on hover."""
    args, rows = run.args, []
    for i, response in enumerate(batch.responses[:args.picture_rollouts]):
        text, spans = common.response_token_spans(run.tokenizer, response)
        values, d = route[i, :len(response)].tolist(), kl[i, :len(response)].tolist()
        rows.append({"tokens": [text[a:b] for a, b in spans], "values": values,
                     "hover": [f"D={x:.4f}" if r else "" for r, x in zip(values, d)],
                     "label": f"step {step} | reward {batch.rewards[i]:g} | {labels[i] or '-'}\n"
                              f"{batch.problems[i // args.num_generations]['problem']}"})
    note = (f"Colour: each token's routing class (--route {args.route}, --annotator "
            f"{args.annotator}); hover: the full-vocabulary KL D_t before the --kl_clip bound. "
            f"From step {args.kl_end} on all is GRPO: the picture keeps the last routed step.")
    return dict(rows=rows, value_name="route", scale=ROUTE_COLOURS, note=note,
                title=f"{run.dir.name}: routing per token") if rows else None


def check_args(args) -> None:
    """Refuse bad option combinations in one line naming the fix; note the toy's self annotator."""
    if args.kl_end < args.kl_hold:
        raise common.UserError(f"--kl_end {args.kl_end}: must be >= --kl_hold {args.kl_hold}.")
    if args.annotator == "oracle" and args.dataset != "toy":
        raise common.UserError("--annotator oracle is for the toy task only: use --dataset toy.")
    if args.annotator == "api" and not (args.annotator_url and args.annotator_model):
        raise common.UserError("--annotator api needs --annotator_url and --annotator_model.")
    if args.annotator == "api" and args.annotator_key_env not in ("", *os.environ):
        raise common.UserError(f"--annotator_key_env {args.annotator_key_env}: not set; export it.")
    if args.dataset == "toy" and args.annotator == "self" and args.lambda_0 > 0:
        common.print0("[trace] note: the tiny toy model cannot annotate: the run stops after "
                      "--annotator_patience steps; see TRACE's routing with --annotator oracle")


# ---- training ---------------------------------------------------------------------------------
def main(argv=None):
    args = common.parse_args(Args, argv)
    common.validate_args(args, RULES)  # every option's range before anything loads: one line
    check_args(args)
    # the teacher: a frozen copy of the policy, refreshed every --teacher_sync_every steps (1: live)
    copy = args.lambda_0 > 0 and args.kl_end > 0 and args.teacher_sync_every > 1
    run = common.setup(args, f"trace_{args.route}", EVAL_PROTOCOL, STEP_LINE,
                       group=args.num_generations, teacher=args.model if copy else None,
                       teacher_in_checkpoint=True, safe_on_resume=SAFE_ON_RESUME)
    if args.eval_only:
        return common.eval_only(run)
    model, group, world, pad_id = run.model, args.num_generations, run.dist.world_size, \
        run.tokenizer.pad_token_id
    kl_steps = args.lambda_0 > 0 and run.start_step < args.kl_end
    refreshes = run.state.get("teacher_refreshes", 0)
    failures = {"steps": run.state.get("annotation_failed_steps", 0), "error": ""}
    # a checkpoint without the copy (an older version's): re-copied from the resumed weights
    stale = run.teacher is not None and run.checkpoint is not None and not run.teacher_restored
    common.print0(f"[trace] {run.dir.name}: {args.num_steps} steps x {args.num_problems} problems "
                  f"x {group} rollouts on {world} rank(s) ({run.dist.device}), --route {args.route}"
                  f", --annotator {args.annotator}, --teacher_context {args.teacher_context}, "
                  f"lambda_0 {args.lambda_0} held to step {args.kl_hold}, 0 at {args.kl_end}")
    for step in common.train_steps(run):
        lam = kl_weight(step, args.lambda_0, args.kl_hold, args.kl_end)
        if lam == 0 and run.teacher is not None:  # the KL window is over: free the copy for good
            run.teacher = teacher = None
            gc.collect()
            torch.cuda.empty_cache()  # a no-op unless CUDA is in use

        # ---- 1. rollouts: G samples per problem, this rank's slice of the global batch
        batch = common.sample_rollouts(run, group)
        responses, n = batch.responses, len(batch.responses)

        # ---- 2. verifier rewards and GRPO group advantages A_i
        reward_groups = torch.tensor(batch.rewards).view(-1, group)
        sequence_advantages = group_advantages(reward_groups, args.scale_rewards).flatten()

        # ---- 3. while lambda_k > 0: the annotator's spans -> routed tokens S, teacher prompts
        width = max([1] + [len(r) for r in responses])
        route, labels, teacher_prompts, counts = annotate(run, batch, step, failures) \
            if lam > 0 else (torch.zeros(n, width), [""] * n, {}, dict.fromkeys(COUNTS, 0.0))

        # ---- 4. the teacher (the copy refreshed on schedule) reads each routed rollout
        if lam > 0 and run.teacher is not None and (step % args.teacher_sync_every == 0 or stale):
            common.copy_weights(run.teacher, model)
            refreshes, stale = refreshes + 1, False
        teacher = run.teacher if run.teacher is not None else model
        route = route.to(run.dist.device)
        # the behaviour policy's log-probs are needed apart only when a batch gets several updates
        if args.num_minibatches > 1:
            behaviour_logprobs, _, _ = common.rollout_logprobs(run, model, batch.prompts, responses)

        # ---- 5. loss: GRPO on N, faded GRPO + lambda_k * bounded KL on S, global token-mean
        model.train()
        fade = 1.0 - lam / args.lambda_0 if args.lambda_0 > 0 else 1.0
        kl_raw, kl_bounded, gap = (torch.zeros_like(route) for _ in range(3))
        sums, order = dict.fromkeys(["loss", "kl_loss", "entropy", "clipped", "tis"], 0.0), []
        per_minibatch = n // args.num_minibatches
        lengths = [len(p) + len(r) for p, r in zip(batch.prompts, responses)]
        for minibatch in range(args.num_minibatches):
            owned = range(minibatch * per_minibatch, (minibatch + 1) * per_minibatch)
            minibatch_tokens = common.all_reduce_sum(sum(len(responses[i]) for i in owned)).item()
            minibatch_sequences = common.all_reduce_sum(len(owned)).item()
            for rows in common.micro_batches(owned, lengths, args.micro_batch_size,
                                             args.micro_batch_tokens, same_count=True):
                order.append(rows)  # the micro-batches in loss-loop order, for the diagnostics
                # the teacher on the routed rows, no gradient (on every rank if any has some: FSDP)
                sub = [k for k, i in enumerate(rows) if i in teacher_prompts]
                routed, teacher_hidden = [rows[k] for k in sub], None
                if lam > 0 and common.all_reduce_sum(float(len(routed))).item() > 0:
                    scored = routed or rows[:1]
                    with torch.no_grad():
                        teacher_hidden, _, _ = common.response_hidden(
                            teacher, [teacher_prompts.get(i, batch.prompts[i]) for i in scored],
                            [responses[i] for i in scored], pad_id)
                hidden, targets, mask = common.response_hidden(
                    model, [batch.prompts[i] for i in rows], [responses[i] for i in rows], pad_id)
                head = common.output_head(model)
                logprobs, entropy = common.token_logprob_entropy(
                    head, hidden, targets, mask, args.logprob_chunk_size, args.temperature)
                cols = slice(0, mask.shape[1])
                # the behaviour policy (the weights that sampled) gives the ratio's denominator
                old_logprobs = behaviour_logprobs[rows, cols] if args.num_minibatches > 1 \
                    else logprobs.detach()
                advantages = sequence_advantages[rows].to(mask.device)[:, None].expand(mask.shape)
                weights = torch.where(route[rows, cols] != 0, fade, 1.0) * mask
                tis = None
                if args.tis_cap > 0:
                    tis = common.tis_weights(old_logprobs, batch.sampler_logprobs[rows, cols],
                                             mask, args.tis_cap)
                    sums["tis"] += tis[mask].sum()
                loss = policy_loss(logprobs, old_logprobs, advantages, weights, minibatch_tokens,
                                   args.clip_low, args.clip_high, tis)
                kl_loss = torch.zeros((), device=mask.device)
                if teacher_hidden is not None and routed:  # the KL on S, over the routed rows
                    kl_loss, *per_token = span_kl(
                        args, lam, (head, hidden[sub], logprobs.detach()[sub]),
                        (common.output_head(teacher), teacher_hidden), targets[sub], route[routed],
                        [len(responses[i]) for i in routed], minibatch_tokens, minibatch_sequences)
                    for out, value in zip((kl_raw, kl_bounded, gap), per_token):
                        out[routed, :value.shape[1]] = value
                ((loss + kl_loss) * world).backward()  # FSDP averages gradients; we want the sum
                ratio = torch.exp(logprobs.detach() - old_logprobs)[mask]
                sums["loss"] += loss.detach() + kl_loss.detach()
                sums["kl_loss"] += kl_loss.detach()
                sums["entropy"] += entropy.detach()[mask].sum()
                sums["clipped"] += ((ratio < 1 - args.clip_low)
                                    | (ratio > 1 + args.clip_high)).sum()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.engine.update_weights(model)

        # ---- 6. metrics, token picture (after kl_end: the last routed step's), checkpoint
        span = route != 0
        sums.update(counts, fkl_tokens=(route > 0).sum(), rkl_tokens=(route < 0).sum(),
                    kl_raw=common.loop_sum(kl_raw, span, order),
                    kl_bounded=common.loop_sum(kl_bounded, span, order),
                    kl_over_clip=(kl_raw[span] > args.kl_clip).sum() if args.kl_clip else 0.0,
                    gap_key=common.loop_sum(gap, route > 0, order),
                    gap_error=common.loop_sum(gap, route < 0, order),
                    careful=sum(common.writes_work(text) for text in batch.texts),
                    zero_adv_groups=int((reward_groups.amax(1) == reward_groups.amin(1)).sum()))
        totals, metrics = common.step_metrics(run, batch, sums, grad_norm, args.num_minibatches)
        tokens, routed_tokens = totals["tokens"], totals["fkl_tokens"] + totals["rkl_tokens"]
        metrics.update({
            "kl_loss": totals["kl_loss"] / args.num_minibatches, "lambda_k": lam,
            "annotated": totals["annotated"],
            "annotation_success": common.ratio(totals["annotation_ok"], totals["annotated"]),
            "annotation_failed": totals["annotated"] - totals["annotation_ok"],
            "coverage": common.ratio(totals["covered"], totals["annotated"]),
            "share_fkl": totals["fkl_tokens"] / tokens, "share_rkl": totals["rkl_tokens"] / tokens,
            "share_grpo": 1 - routed_tokens / tokens,
            "kl_routed": common.ratio(totals["kl_raw"], routed_tokens),
            "kl_routed_bounded": common.ratio(totals["kl_bounded"], routed_tokens),
            "kl_over_clip_frac": common.ratio(totals["kl_over_clip"], routed_tokens),
            "logp_gap_key": common.ratio(totals["gap_key"], totals["fkl_tokens"]),
            "logp_gap_error": common.ratio(totals["gap_error"], totals["rkl_tokens"]),
            "teacher_refreshes": refreshes, "careful_frac": totals["careful"] / totals["sequences"],
            "zero_adv_groups": totals["zero_adv_groups"] / args.num_problems})
        if run.dist.is_main and (lam > 0 or run.picture is None or not kl_steps):
            run.picture = picture(run, batch, step + 1, route, kl_raw, labels)
        # the teacher copy goes along when the next step uses it without refreshing it first
        keep = run.teacher is not None and (step + 1) % args.teacher_sync_every and \
            kl_weight(step + 1, args.lambda_0, args.kl_hold, args.kl_end) > 0
        state = {"teacher_refreshes": refreshes, "annotation_failed_steps": failures["steps"]}
        if common.end_step(run, step, metrics, state, {"teacher": run.teacher} if keep else None):
            break
    return common.finish(run)


if __name__ == "__main__":
    common.run_main(main)
