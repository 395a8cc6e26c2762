"""Shared infrastructure for the four RLVR + on-policy (self-)distillation references.

Infrastructure only: no method's math lives here (advantages, teacher contexts, token weights,
losses and schedules are written out in each method script). Copy one method script together with
this file into another project and it runs.

Surface, in file order:
  distributed   Dist, init_distributed, print0, all_reduce_sum, all_gather_cat, barrier
  arguments     option, parse_args
  models        MODEL_ALIASES, resolve_model, load_tokenizer, load_model, copy_weights
  toy testbed   make_toy_rows, parse_toy_steps, build_toy_model
  data          load_problems, ProblemSampler
  prompts       BOXED_INSTRUCTION, build_prompt
  grading       boxed_span_at, find_last_boxed, extract_boxed_answer, Grader
  rollouts      SamplingParams, RolloutEngine, HFEngine, sample_token, make_engine, stop_token_ids
  log-probs     micro_batches, response_logprobs, response_hidden, output_head, chunked_map, token_logprob_entropy,
                token_kl
  evaluation    evaluate
  logging       Progress, RunLogger
  checkpoints   save_checkpoint, latest_checkpoint, load_checkpoint

Conventions. A "response batch" is B sequences `prompt_ids[i] + response_ids[i]`; per-token
quantities are returned response-aligned as [B, R] tensors (R = longest response) with a boolean
mask, so a student and a teacher that see different prompts line up token for token.
Under FSDP2 (`fully_shard`), weights are fp32 masters; on CUDA compute runs in bf16.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Start the process group under `torchrun` (NCCL on CUDA, gloo on CPU); plain `python` -> 1 rank."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Dist(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only, flushed (torchrun interleaves buffered output)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(value):
    """Sum over ranks. Takes a number, a tensor (returned as float64 on CPU) or a dict of numbers
    (returned as a dict of floats, reduced in one collective)."""
    if isinstance(value, dict):
        totals = all_reduce_sum(torch.tensor([float(v) for v in value.values()], dtype=torch.float64))
        return dict(zip(value.keys(), totals.tolist()))
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    if _distributed():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        tensor = tensor.to(device)
        dist.all_reduce(tensor)
        tensor = tensor.cpu()
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank (same order on every rank)."""
    tensor = tensor.detach().flatten().float().cpu()
    if not _distributed():
        return tensor
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, tensor)
    return torch.cat(parts)


def barrier() -> None:
    if _distributed():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def option(default, help: str):
    """A dataclass field with its `--help` text: `lr: float = option(1e-6, "AdamW learning rate")`."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_args(args_class, argv: Sequence[str] | None = None):
    """Parse the command line into the script's `Args` dataclass with transformers' HfArgumentParser."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(args=argv)
    return args


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------

MODEL_ALIASES = {
    name: f"Qwen/{name}"
    for name in ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B",
                 "Qwen3-30B-A3B", "Qwen3-4B-Instruct-2507"]
}


def resolve_model(name: str) -> str:
    """Map `--model` to something `from_pretrained` takes: built-in toy, alias, local dir or hub id."""
    if name in TOY_SPECS:
        return str(build_toy_model(name))
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"--model {name!r} is a directory without config.json: point it at a "
                             "Hugging Face model folder (save_pretrained output).")
        return name
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) and not name.startswith((".", "~")):
        return name  # hub id, e.g. Qwen/Qwen3-8B (needs network or a populated HF cache)
    raise ValueError(
        f"Unknown --model {name!r}. Use one of: {', '.join(TOY_SPECS)} (built-in, offline); a short "
        f"alias ({', '.join(MODEL_ALIASES)}); a hub id like 'Qwen/Qwen3-8B'; or a local model directory.")


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(f"Tokenizer of {name!r} has no chat template; use an instruct/chat model "
                         "(prompts are built with apply_chat_template).")
    return tokenizer


def load_model(name: str, dist_info: Dist, *, trainable: bool = True, activation_checkpointing: bool = False):
    """Load a causal LM onto this rank's device, sharded with FSDP2 where that applies.

    Trainable models keep fp32 master weights (bf16 weights would swallow AdamW updates at lr 1e-6);
    on CUDA they are always wrapped in FSDP2 (also on one GPU) with bf16 compute and fp32 gradient
    reduction. Frozen models (teachers) are bf16 on CUDA. On CPU everything is fp32 and FSDP2 is
    used only when there is more than one rank (gloo).
    """
    from transformers import AutoModelForCausalLM

    cuda = dist_info.device.type == "cuda"
    dtype = torch.bfloat16 if (cuda and not trainable) else torch.float32
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=dtype).to(dist_info.device)
    if activation_checkpointing:  # the method's name changed in transformers 5.x; same behaviour
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cuda or dist_info.world_size > 1:
        _fully_shard(model, dist_info, bf16_compute=cuda and trainable)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def _fully_shard(model, dist_info: Dist, bf16_compute: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_compute \
        else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"Cannot find decoder layers ({block_names}) of {type(model).__name__} to shard.")
    for block in blocks:  # one FSDP unit per decoder layer, then the root (embeddings, norm, lm_head)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def copy_weights(dst_model, src_model) -> None:
    """dst <- src, parameter by parameter (both loaded by `load_model` with the same sharding)."""
    dst_params, src_params = dict(dst_model.named_parameters()), dict(src_model.named_parameters())
    if dst_params.keys() != src_params.keys():
        raise ValueError("copy_weights: the two models have different parameter names.")
    for name, dst_param in dst_params.items():
        src, dst = src_params[name], dst_param
        src = src.to_local() if hasattr(src, "to_local") else src
        dst = dst.to_local() if hasattr(dst, "to_local") else dst
        if src.shape != dst.shape:
            raise ValueError(f"copy_weights: shape mismatch for {name}: {tuple(src.shape)} vs {tuple(dst.shape)}")
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# Toy testbed: synthetic arithmetic with worked solutions, and tiny Qwen3 models made by SFT
# ---------------------------------------------------------------------------------------------
#
# A problem is "Compute 37+48-12." with a worked solution of one line per step,
#   37+48=85
#   85-12=73
#   \boxed{73}
# Levels 1-4 (1-digit sum; 2-digit + 1-digit; 2-digit +/-; a 3-operand chain) spread the difficulty.
# Each step line is `left op right=result` and re-computable, so an oracle can find the first wrong
# step of a response and its key step (the last step, which produces the answer): parse_toy_steps.

TOY_VERSION = "v1"
TOY_SPLIT_SEEDS = {"train": 1, "test": 2}  # disjoint generator streams for the two splits
TOY_SPLIT_SIZES = {"train": 4096, "test": 256}
TOY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
TOY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Privileged context the toy SFT teaches the model to use: a reference-solution block in the user
# message, optionally followed by one feedback line (the method scripts build contexts of this form).
TOY_CONTEXT_HEADER = "Reference solution:\n"
TOY_FEEDBACK_LINES = ["Your previous attempt was correct.", "Your previous attempt was incorrect.", ""]
TOY_PHRASES = ["user", "assistant", "Compute ", "\\boxed{", "\n\n", TOY_CONTEXT_HEADER, *TOY_FEEDBACK_LINES[:2]]
# Architecture and SFT recipe of each toy model; `context_frac` = share of SFT examples whose prompt
# carries a reference solution. Sized so that building both takes under 3 minutes on 2 CPU cores.
TOY_SPECS = {
    "toy": dict(layers=3, hidden=64, heads=4, intermediate=128, steps=320, batch_size=96, lr=3e-3, context_frac=0.3),
    "toy-large": dict(layers=3, hidden=64, heads=4, intermediate=256, steps=400, batch_size=96, lr=3e-3,
                      context_frac=0.3),
}


def make_toy_rows(n: int, seed: int) -> list[dict]:
    """n deterministic arithmetic problems with `problem`, `answer`, `solution` and `level`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        level = rng.randint(1, 4)
        if level == 1:  # 1-digit sum
            operands, ops = [rng.randint(0, 9), rng.randint(0, 9)], ["+"]
        elif level == 2:  # 2-digit plus 1-digit
            operands, ops = [rng.randint(10, 99), rng.randint(0, 9)], ["+"]
        elif level == 3:  # 2-digit sum or difference
            operands, ops = [rng.randint(10, 99), rng.randint(10, 99)], [rng.choice("+-")]
        else:  # two steps: 2-digit, then two 1-digit operands
            operands, ops = [rng.randint(10, 99), rng.randint(0, 9), rng.randint(0, 9)], [rng.choice("+-"), "+"]
        value, lines, expression = operands[0], [], str(operands[0])
        for op, right in zip(ops, operands[1:]):
            if op == "-" and right > value:  # keep every intermediate result non-negative
                op = "+"
            result = value + right if op == "+" else value - right
            lines.append(f"{value}{op}{right}={result}")
            expression += f"{op}{right}"
            value = result
        lines.append(f"\\boxed{{{value}}}")
        rows.append({"problem": f"Compute {expression}.", "answer": str(value),
                     "solution": "\n".join(lines), "level": level})
    return rows


def parse_toy_steps(problem: str, response: str) -> list[dict]:
    """Split a toy response into its non-empty lines, each judged locally.

    Each dict: `start`, `end` (character span in `response`), `text`, `final` (a `\\boxed{}` line)
    and `correct`: for step k, the line is `left op right=result` with `left` the previous line's
    stated result (the first operand for k = 0), `op right` the problem's k-th operation and the
    arithmetic right; a final line is correct when it boxes the true answer. So the first line with
    `correct=False` is the first wrong step, and the last step line is the key step of a correct one.
    """
    terms = re.findall(r"([+-]?)(\d+)", problem)
    operations = [(op, int(number)) for op, number in terms[1:]]
    answer = int(terms[0][1]) if terms else None
    for op, number in operations:
        answer = answer + number if op == "+" else answer - number
    expected_left, step, steps, position = (int(terms[0][1]) if terms else None), 0, [], 0
    for line in response.split("\n"):
        start, end = position, position + len(line)
        position = end + 1
        match = re.fullmatch(r"(\d+)([+-])(\d+)=(-?\d+)", line.strip())
        boxed = re.fullmatch(r"\\boxed\{(-?\d+)\}", line.strip())
        correct = False
        if match:
            left, op, right, result = int(match[1]), match[2], int(match[3]), int(match[4])
            correct = (left == expected_left and step < len(operations) and (op, right) == operations[step]
                       and result == (left + right if op == "+" else left - right))
            expected_left, step = result, step + 1
        elif boxed:
            correct = int(boxed[1]) == answer
        if line.strip():
            steps.append({"start": start, "end": end, "text": line, "correct": correct, "final": bool(boxed)})
    return steps


def _toy_cache_root() -> Path:
    return Path(os.environ.get("RLVR_TOY_CACHE", Path.home() / ".cache" / "rlvr-distill-toy"))


def _build_toy_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(TOY_SPECIALS)}
    for char in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[char] = len(vocab)
    # BPE without merges = one token per character (offsets are character offsets); the fixed
    # phrases of the prompt format are single tokens, which keeps sequences short on a CPU.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.add_special_tokens(TOY_SPECIALS)
    backend.add_tokens([AddedToken(phrase, normalized=False, special=False)
                        for phrase in [*TOY_PHRASES, BOXED_INSTRUCTION]])
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = TOY_CHAT_TEMPLATE
    return tokenizer


def build_toy_model(name: str = "toy") -> Path:
    """Return the directory of a built-in toy model, building it on first use (cached, file-locked).

    A tiny Qwen3ForCausalLM with a character-level tokenizer, trained by a short deterministic SFT
    on toy problems: half of the examples show the plain prompt, half add a reference solution
    (`TOY_CONTEXT_HEADER`) so that a self-teacher with privileged context is informative.
    """
    if name not in TOY_SPECS:
        raise ValueError(f"Unknown toy model {name!r}; choose from {list(TOY_SPECS)}.")
    recipe = hashlib.sha1(json.dumps([TOY_VERSION, TOY_SPECS[name]], sort_keys=True).encode()).hexdigest()[:8]
    target = _toy_cache_root() / f"{name}-{recipe}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; others wait and reuse
        if not (target / "config.json").exists():
            _train_toy_model(name, target)
    return target


def _train_toy_model(name: str, target: Path) -> None:
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    spec = TOY_SPECS[name]
    steps, batch_size = spec["steps"], spec["batch_size"]
    started = time.time()
    print(f"[toy] building {name!r} once ({spec['layers']} layers, hidden {spec['hidden']}, {steps} SFT steps; "
          f"about a minute or two on a laptop CPU) -> {target}", flush=True)
    tokenizer = _build_toy_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        head_dim=spec["hidden"] // spec["heads"], max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cpu_rng_state = torch.get_rng_state()
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    rng = random.Random(0)
    rows = make_toy_rows(8000, seed=1000)  # its own stream: not the train/test splits
    response_ids = [tokenizer(row["solution"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                    for row in rows]
    plain = [(build_prompt(tokenizer, row["problem"]), response) for row, response in zip(rows, response_ids)]
    with_context = []
    for row, response in zip(rows, response_ids):
        feedback = rng.choice(TOY_FEEDBACK_LINES)
        context = TOY_CONTEXT_HEADER + row["solution"] + (f"\n\n{feedback}" if feedback else "")
        with_context.append((build_prompt(tokenizer, row["problem"], context), response))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    for step in range(steps):
        # a batch is all-plain or all-with-context: similar lengths, less padding on a CPU
        pool = with_context if rng.random() < spec["context_frac"] else plain
        batch = [pool[rng.randrange(len(pool))] for _ in range(batch_size)]
        length = max(len(p) + len(r) for p, r in batch)
        input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        attention = torch.zeros((batch_size, length), dtype=torch.long)
        for i, (prompt, response) in enumerate(batch):
            ids = prompt + response
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(prompt): len(ids)] = torch.tensor(response)
            attention[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"[toy] {name} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    torch.set_rng_state(cpu_rng_state)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    print(f"[toy] built {name!r} in {time.time() - started:.0f}s", flush=True)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

DAPO_PREFIX = "Solve the following math problem step by step."
DAPO_SUFFIX = "Remember to put your answer on its own line after"


def _get_key(row: dict, key: str):
    """Column lookup with dotted paths for nested fields, e.g. `reward_model.ground_truth`."""
    value = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _dapo_problem(prompt) -> str | None:
    """DAPO-Math-17k stores a chat message list whose text wraps the problem in its own instructions."""
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict):
        return None
    text = prompt[-1].get("content")
    if not isinstance(text, str):
        return None
    paragraphs = text.strip().split("\n\n")
    if paragraphs and paragraphs[0].startswith(DAPO_PREFIX):
        paragraphs = paragraphs[1:]
    if paragraphs and paragraphs[-1].startswith(DAPO_SUFFIX):
        paragraphs = paragraphs[:-1]
    return "\n\n".join(paragraphs).strip() or None


def _is_dapo(name: str, columns: Sequence[str]) -> bool:
    return "dapo-math" in name.lower() or ("prompt" in columns and "reward_model" in columns)


def load_problems(name: str, split: str = "train", problem_key: str = "problem", answer_key: str = "answer",
                  solution_key: str = "solution", limit: int | None = None) -> list[dict]:
    """Load math problems as dicts with `problem`, `answer`, `solution` (may be empty).

    `name`: `toy` (built-in, split train/test); a local .jsonl/.json/.parquet file; or a hub dataset
    through `datasets.load_dataset` (DAPO-Math-17k and MATH-500 are recognised; others use the
    keys). Rows without an answer or with a malformed problem are skipped and counted; a missing
    column, an unreadable or an empty dataset is an error that says what to do.
    """
    if name == "toy":
        if split not in TOY_SPLIT_SEEDS:
            raise ValueError(f"The toy dataset has splits {list(TOY_SPLIT_SEEDS)}, not {split!r}.")
        rows = make_toy_rows(TOY_SPLIT_SIZES[split], TOY_SPLIT_SEEDS[split])
        return rows[:limit] if limit else rows
    raw = _read_rows(name, split)
    columns = list(raw[0].keys()) if raw and isinstance(raw[0], dict) else []
    dapo = _is_dapo(name, columns)
    if dapo:  # DAPO-Math-17k: problem inside the chat prompt, answer under reward_model
        problem_key, answer_key = "prompt", "reward_model.ground_truth"
    for key, flag in [(problem_key, "--problem_key"), (answer_key, "--answer_key")]:
        if not any(_get_key(row, key) is not None for row in raw if isinstance(row, dict)):
            raise ValueError(f"Dataset {name!r} has no column {key!r} (set {flag}); its columns are {columns}.")
    rows, no_answer, malformed = [], 0, 0
    for row in raw:
        if not isinstance(row, dict):
            malformed += 1
            continue
        problem = _dapo_problem(row.get("prompt")) if dapo else _get_key(row, problem_key)
        answer = _get_key(row, answer_key)
        solution = _get_key(row, solution_key)
        if not isinstance(problem, str) or not problem.strip():
            malformed += 1
            continue
        if answer is None or not str(answer).strip():
            no_answer += 1
            continue
        rows.append({"problem": problem.strip(), "answer": str(answer).strip(),
                     "solution": solution.strip() if isinstance(solution, str) else ""})
    if not rows:
        raise ValueError(f"Dataset {name!r} ({split}) has no usable rows ({len(raw)} read, {no_answer} "
                         f"without an answer, {malformed} malformed); check the file and the *_key options.")
    if no_answer or malformed:
        print0(f"[data] {name}: skipped {no_answer} rows without an answer and {malformed} malformed rows")
    print0(f"[data] {name} ({split}): {len(rows)} problems")
    return rows[:limit] if limit else rows


def _read_rows(name: str, split: str) -> list:
    import datasets

    path = Path(name).expanduser()
    suffix = path.suffix.lower()
    if not path.exists() and (name.startswith((".", "/", "~")) or suffix in (".jsonl", ".json", ".parquet")):
        raise ValueError(f"Dataset file {name!r} does not exist.")
    if path.exists() and suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"Dataset file {name!r}: unsupported extension; use .jsonl, .json or .parquet.")
    try:
        if suffix in (".jsonl", ".json"):
            return _read_json_rows(path)
        if suffix == ".parquet":
            return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        return list(datasets.load_dataset(name, split=split))
    except Exception as error:  # unreadable file, unknown hub name, no network, bad split
        raise ValueError(f"Cannot read dataset {name!r} (split {split!r}): {type(error).__name__}: {error}") from error


def _read_json_rows(path: Path) -> list:
    text = path.read_text()
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            rows.append(None)  # counted as malformed by load_problems
            print0(f"[data] {path}:{number}: not valid JSON, skipped")
    return rows


class ProblemSampler:
    """Endless stream of shuffled problem indices, reshuffled each epoch; exact resume via state_dict."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def next(self, count: int) -> list[int]:
        indices, order = [], self._order()
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch, self.position, order = self.epoch + 1, 0, None
                order = self._order()
            indices.append(int(order[self.position]))
            self.position += 1
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(tokenizer, problem: str, context: str | None = None, enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the chat prompt for `problem`; `context` (privileged information) is appended to
    the user message for a teacher. Responses are appended as token ids, so they are identical under
    the student and the teacher prompt. `enable_thinking` is passed to Qwen3 templates when set."""
    content = f"{problem}\n\n{BOXED_INSTRUCTION}"
    if context:
        content += f"\n\n{context}"
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------


def boxed_span_at(text: str, start: int) -> tuple[int, int] | None:
    """(start, end) character span of the `\\boxed{...}` that begins at `start` (braces matched), or
    None when its braces never close."""
    brace = start + len("\\boxed")
    while brace < len(text) and text[brace] == " ":
        brace += 1
    if brace < len(text) and text[brace] == "{":
        depth = 0
        for position in range(brace, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                return start, position + 1
    return None


def find_last_boxed(text: str) -> tuple[int, int] | None:
    """(start, end) character span of the last complete `\\boxed{...}` (braces matched), or None.
    With nested boxes that is the innermost last one."""
    start = text.rfind("\\boxed")
    while start != -1:
        span = boxed_span_at(text, start)
        if span is not None:
            return span
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_boxed_answer(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (after any `</think>`), or None when there is none."""
    text = text.split("</think>")[-1]
    span = find_last_boxed(text)
    if span is None:
        return None
    inner = text[span[0]: span[1]]
    return inner[inner.index("{") + 1: -1].strip()


_GRADER_WORKER = r"""
import json, sys
from math_verify import parse, verify
timeout = int(sys.argv[1])
for line in sys.stdin:
    request = json.loads(line)
    try:
        gold = parse(request["gold"], parsing_timeout=timeout)
        pred = parse(request["pred"], parsing_timeout=timeout)
        ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout)
    except Exception:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n")
    sys.stdout.flush()
"""


class Grader:
    """Rewards in {0, 1} with math-verify (gold first), the answer taken from the last `\\boxed{}`.

    math-verify runs in a worker subprocess that answers one line per request line. A batch is sent
    in one go and identical (gold, answer) pairs are graded once. Every answer has a hard
    wall-clock bound (`timeout` seconds after the previous one): a worker that does not answer in
    time is killed, that answer gets reward 0 and is counted as a timeout, and the rest of the
    batch goes to a fresh worker, so no input can stall a run.
    """

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout
        self._worker: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        inner = max(1, int(self.timeout))  # math-verify's own (signal based) limits, seconds
        return subprocess.Popen([sys.executable, "-u", "-c", _GRADER_WORKER, str(inner)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def _ask(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Send (gold, pred) pairs to the worker; return its verdicts, in order, up to the first late one."""
        grace = 0.0
        if self._worker is None or self._worker.poll() is not None:
            self._worker, grace = self._start(), 60.0  # importing sympy takes a few seconds
        requests = "".join(json.dumps({"gold": gold, "pred": pred}) + "\n" for gold, pred in pairs).encode()
        # a thread writes, so that a batch larger than the pipe buffer cannot block us past the bound
        writer = threading.Thread(target=_write_all, args=(self._worker.stdin, requests), daemon=True)
        writer.start()
        stdout, received, verdicts = self._worker.stdout.fileno(), b"", []
        while len(verdicts) < len(pairs):
            if b"\n" not in received:  # wait for the next answer, at most timeout (+ start-up) seconds
                ready, _, _ = select.select([stdout], [], [], self.timeout + grace)
                chunk = os.read(stdout, 65536) if ready else b""
                if not chunk:  # hung (no answer in time) or died (end of file)
                    self.close()  # kill it; the next call starts a fresh one
                    break
                received += chunk
                continue
            line, received = received.split(b"\n", 1)
            if line.strip() not in (b"0", b"1"):
                self.close()
                break
            verdicts.append(line.strip() == b"1")
            grace = 0.0
        writer.join()  # done: the worker read every request, or it was killed (the write fails at once)
        return verdicts

    def grade(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict]:
        """Rewards for `responses` against gold `answers`, plus counts of `no_answer` and `timeout`."""
        rewards, counts = [0.0] * len(responses), {"no_answer": 0, "timeout": 0}
        asked: dict[tuple[str, str], list[int]] = {}  # (gold, pred) -> the responses that give it
        for i, (response, gold) in enumerate(zip(responses, answers)):
            pred = extract_boxed_answer(response)
            if pred is None:
                counts["no_answer"] += 1  # reward 0
                continue
            gold_text = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"
            asked.setdefault((gold_text, f"\\boxed{{{pred}}}"), []).append(i)
        pairs, verdicts = list(asked), []
        while len(verdicts) < len(pairs):
            verdicts += self._ask(pairs[len(verdicts):])
            if len(verdicts) < len(pairs):
                verdicts.append(None)  # the worker hung on this pair: a timeout; the rest go to a fresh one
        for pair, verdict in zip(pairs, verdicts):
            for i in asked[pair]:
                rewards[i] = 1.0 if verdict else 0.0
                counts["timeout"] += verdict is None
        return rewards, counts

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:  # plain try: also runs at interpreter shutdown, when modules are half torn down
                worker.kill()
                worker.wait(timeout=5)
            except Exception:
                pass

    def __del__(self):
        self.close()


def _write_all(stream, data: bytes) -> None:
    """Write bytes to a pipe, unbuffered; a killed reader ends it (broken pipe)."""
    try:
        while data:
            data = data[os.write(stream.fileno(), data):]
    except (OSError, ValueError):  # the worker was killed meanwhile: nothing left to write to
        pass


# ---------------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (Qwen3 stops on two)."""
    ids = {tokenizer.eos_token_id}
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return sorted(i for i in ids if i is not None)


class RolloutEngine:
    """Interface of a rollout engine: sample from token ids; receive new weights after each step.

    `generate(prompts, params)` takes a list of prompt token-id lists and returns, per prompt, one
    sampled response as token ids, ending with the stop token when one was produced (truncated
    responses have none). Every rank calls it with the same number of prompts.
    """

    def generate(self, prompts: list[list[int]], params: SamplingParams, desc: str = "generate") -> list[list[int]]:
        raise NotImplementedError

    def update_weights(self, model) -> None:
        """Push the policy's new weights to the engine (a no-op when it samples from the policy itself)."""


class HFEngine(RolloutEngine):
    """Samples from the training model itself with a plain loop over a Hugging Face KV cache.

    A row that has produced a stop token leaves the batch (the cache is copied without its rows), so
    short responses cost nothing while long ones finish. Works sharded: under FSDP2 every rank runs the
    same number of forward passes, and a rank whose rows have all stopped keeps one in the batch,
    ignored, until every rank is done.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = set(stop_token_ids(tokenizer, model))

    @torch.no_grad()
    def generate(self, prompts, params, desc="generate"):
        was_training = self.model.training
        self.model.eval()
        responses, progress = [], Progress(len(prompts), desc)
        for start in range(0, len(prompts), self.batch_size):
            responses += self._sample(prompts[start: start + self.batch_size], params)
            progress.update(min(self.batch_size, len(prompts) - start))
        progress.close()
        self.model.train(was_training)
        return responses

    def _sample(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row continues at the right edge
            input_ids[i, width - len(prompt):] = torch.tensor(prompt)
            attention[i, width - len(prompt):] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        cache = None  # the model makes its KV cache on the first call
        responses, stopped = [[] for _ in prompts], [False] * len(prompts)
        rows = list(range(len(prompts)))  # the prompt of each batch row
        for step in range(params.max_new_tokens):
            output = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, tokens = output.past_key_values, sample_token(output.logits[:, -1], params)
            for row, token in zip(rows, tokens.tolist()):
                if not stopped[row]:
                    responses[row].append(token)
                    stopped[row] = token in self.stop_ids
            keep = torch.tensor([not stopped[row] for row in rows])
            if step + 1 == params.max_new_tokens or not _any_rank(bool(keep.any())):
                break
            if not keep.any():
                keep[0] = True  # another rank is still sampling: stay in step with it (tokens ignored)
            if not keep.all():  # stopped rows leave the batch (the cache is copied without them)
                rows = [row for row, kept in zip(rows, keep.tolist()) if kept]
                kept = keep.nonzero()[:, 0].to(device)
                cache.batch_select_indices(kept)
                tokens, attention, positions = tokens[kept], attention[kept], positions[kept]
            input_ids = tokens[:, None]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
        return responses


def _any_rank(flag: bool) -> bool:
    """True when `flag` is true on some rank."""
    return bool(all_reduce_sum(float(flag)) > 0) if _distributed() else flag


def sample_token(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One token per row of [B, V] logits: argmax at temperature 0, else a sample after temperature,
    top-k and top-p (nucleus: the most likely tokens whose probabilities first reach top_p) filtering."""
    logits = logits.float()
    if params.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth_largest = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= params.top_p  # the mass before it already reaches top_p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def make_engine(kind: str, model, tokenizer, batch_size: int = 64) -> RolloutEngine:
    if kind == "hf":
        return HFEngine(model, tokenizer, batch_size)
    if kind == "vllm":
        raise NotImplementedError("--rollout vllm is not implemented yet (it is planned; the RolloutEngine "
                                  "interface in common.py is where it plugs in). Use --rollout hf.")
    raise ValueError(f"Unknown --rollout {kind!r}; choose hf (or vllm, once available).")


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities, entropy and divergences, chunked over positions
# ---------------------------------------------------------------------------------------------


def micro_batches(indices: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Split `indices` into micro-batches of at most `size`, sequences of similar `lengths[i]`
    together so that less compute goes to padding (a sum over micro-batches does not depend on the split)."""
    order = sorted(indices, key=lambda i: lengths[i])
    return [order[start: start + size] for start in range(0, len(order), size)]


def response_hidden(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Final hidden states that predict each response token: (hidden [B,R,H], targets [B,R], mask [B,R]).

    The model runs its own forward (so FSDP2 all-gathers and frees weights as usual) but its output
    projection is skipped: a pre-hook captures the projection's input and hands it an empty slice,
    so no [B, T, vocab] logits are ever built. Project with `output_head(model)` chunk by chunk.
    """
    device = next(model.parameters()).device
    prompt_lens = torch.tensor([len(p) for p in prompts])
    response_lens = torch.tensor([len(r) for r in responses])
    width, resp_width = int((prompt_lens + response_lens).max()), max(1, int(response_lens.max()))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    targets = torch.full((len(prompts), resp_width), pad_id, dtype=torch.long)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):  # right padding
        ids = list(prompt) + list(response)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        targets[i, : len(response)] = torch.tensor(response, dtype=torch.long)
    mask = torch.arange(resp_width)[None, :] < response_lens[:, None]
    captured = {}

    def skip_projection(module, inputs):
        captured["hidden"] = inputs[0]
        return (inputs[0][:, :0],)

    handle = model.get_output_embeddings().register_forward_pre_hook(skip_projection)
    try:
        model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    # hidden state at position len(prompt) - 1 + j predicts response token j
    positions = (prompt_lens[:, None] - 1 + torch.arange(resp_width)[None, :]).clamp(max=width - 1)
    positions = positions.to(device)[..., None].expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, positions), targets.to(device), mask.to(device)


def output_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits with the model's output projection (call after a forward of that model)."""
    head = model.get_output_embeddings()
    return lambda hidden: F.linear(hidden, head.weight, head.bias)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y_t) [B,R], full-vocabulary entropy [B,R], mask [B,R]) of `model` on each response
    after its prompt: `response_hidden` then `token_logprob_entropy`. Differentiable unless called
    under `torch.no_grad()`."""
    hidden, targets, mask = response_hidden(model, prompts, responses, pad_id)
    logprobs, entropy = token_logprob_entropy(output_head(model), hidden, targets, mask, chunk_size)
    return logprobs, entropy, mask


def chunked_map(fn: Callable, tensors: Sequence[torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, ...]:
    """Apply `fn` to row chunks of equally long tensors and concatenate its outputs.

    With gradients enabled each chunk is checkpointed, so its [chunk, vocab] intermediates are
    freed after the forward and recomputed in backward: peak extra memory is O(chunk x vocab).
    """
    outputs = []
    for start in range(0, tensors[0].shape[0], chunk_size):
        parts = [t[start: start + chunk_size] for t in tensors]
        out = checkpoint(fn, *parts, use_reentrant=False) if torch.is_grad_enabled() else fn(*parts)
        outputs.append(out if isinstance(out, tuple) else (out,))
    if not outputs:
        empty = fn(*[t[:0] for t in tensors])
        return empty if isinstance(empty, tuple) else (empty,)
    return tuple(torch.cat(column) for column in zip(*outputs))


def token_logprob_entropy(logits_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          chunk_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and full-vocabulary entropy per response token ([B,R] each, 0 where masked).

    `logits_fn` maps hidden states to logits (`output_head(model)`); bf16/fp16 logits are upcast to fp32.
    """

    def logprob_and_entropy(h, y):
        logprobs = _log_softmax_fp32(logits_fn(h))
        chosen = logprobs.gather(-1, y[:, None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1)
        return chosen, entropy

    chosen, entropy = chunked_map(logprob_and_entropy, [hidden[mask], targets[mask]], chunk_size)
    return _unflatten(chosen, mask), _unflatten(entropy, mask)


def token_kl(student_logits_fn: Callable, student_hidden: torch.Tensor, teacher_logits_fn: Callable,
             teacher_hidden: torch.Tensor, mask: torch.Tensor, direction: str = "forward",
             chunk_size: int = 512) -> torch.Tensor:
    """Full-vocabulary KL per response token ([B,R], 0 where masked), chunked over positions.

    `forward` = KL(pi_T || pi_S) = sum_v p_T (log p_T - log p_S); `reverse` = KL(pi_S || pi_T).
    Student and teacher hidden states are response-aligned (`response_hidden` of each model on its
    own prompt); gradients flow into the student only if its hidden states carry them. For a
    divergence with per-entry terms (clipping, mixtures), call `chunked_map` with your own function.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', not {direction!r}")

    def kl(h_student, h_teacher):
        student = _log_softmax_fp32(student_logits_fn(h_student))
        teacher = _log_softmax_fp32(teacher_logits_fn(h_teacher))
        if direction == "forward":
            return (teacher.exp() * (teacher - student)).sum(-1)
        return (student.exp() * (student - teacher)).sum(-1)

    (values,) = chunked_map(kl, [student_hidden[mask], teacher_hidden[mask]], chunk_size)
    return _unflatten(values, mask)


def _log_softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in at least fp32 (bf16 logits lose the small probabilities that entropy/KL need)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(engine: RolloutEngine, tokenizer, rows: list[dict], grader: Grader, params: SamplingParams, k: int,
             dist_info: Dist, enable_thinking: bool | None = None) -> dict:
    """avg@k (mean accuracy over k samples) and pass@k (any of k correct), sharded over ranks."""
    per_rank = math.ceil(len(rows) / dist_info.world_size)
    mine = list(range(dist_info.rank, len(rows), dist_info.world_size))
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # equal work on every rank
    prompts = [build_prompt(tokenizer, rows[i]["problem"], enable_thinking=enable_thinking)
               for i in padded for _ in range(k)]
    responses = engine.generate(prompts, params, desc="eval")
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards, counts = grader.grade(texts, [rows[i]["answer"] for i in padded for _ in range(k)])
    correct = torch.tensor(rewards).view(-1, k)[: len(mine)]
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64).view(-1, k)[: len(mine)]
    totals = all_reduce_sum(torch.tensor([
        correct.mean(1).sum(), correct.amax(1).sum(),
        float(len(mine)), lengths.sum(), float(counts["no_answer"]), float(counts["timeout"])], dtype=torch.float64))
    problems = max(totals[2].item(), 1.0)
    return {f"eval/avg@{k}": totals[0].item() / problems, f"eval/pass@{k}": totals[1].item() / problems,
            "eval/response_len": totals[3].item() / (problems * k), "eval/no_answer": totals[4].item(),
            "eval/grader_timeouts": totals[5].item()}


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class Progress:
    """Rank-0 progress lines for long loops (at most one every `every` seconds, plus a summary)."""

    def __init__(self, total: int, desc: str, every: float = 10.0):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.start = self.last = time.time()
        self.show = not dist.is_initialized() or dist.get_rank() == 0

    def update(self, count: int) -> None:
        self.done += count
        now = time.time()
        if self.show and now - self.last >= self.every and self.done < self.total:
            self.last = now
            print(f"  {self.desc}: {self.done}/{self.total} ({self.done / (now - self.start):.1f}/s)", flush=True)

    def close(self) -> None:
        elapsed = time.time() - self.start
        if self.show and elapsed >= self.every:
            print(f"  {self.desc}: {self.total} done in {elapsed:.0f}s", flush=True)


class RunLogger:
    """Metrics to stdout (one line per step), `runs/<run_name>/metrics.jsonl`, TensorBoard when
    installed, and Weights & Biases with `track=True`. Only rank 0 writes."""

    def __init__(self, run_dir: str | Path, config, dist_info: Dist, track: bool = False,
                 project: str = "rlvr-distill", resume_step: int | None = None):
        self.active = dist_info.is_main
        self.run_dir, self.tensorboard, self.wandb = Path(run_dir), None, None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = asdict(config) if is_dataclass(config) else dict(config)
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        path = self.run_dir / "metrics.jsonl"
        kept = []
        if resume_step is not None and path.exists():  # drop records written after the checkpoint
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        except Exception:  # tensorboard not installed
            self.tensorboard = None
        if track:
            try:
                import wandb
            except ImportError as error:
                raise ImportError("--track logs to Weights & Biases: pip install wandb (and wandb login)") from error

            self.wandb = wandb.init(project=project, name=self.run_dir.name, config=config,
                                    resume="allow" if resume_step is not None else None)

    def log(self, step: int, metrics: dict, prefix: str = "step") -> None:
        if not self.active:
            return
        record = {"step": step, **{k: (float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v)
                                   for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, float) and k != "step"}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step")
        print(f"{prefix} {step} | {shown}", flush=True)

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
            if self.wandb is not None:
                self.wandb.finish()


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer, state: dict, dist_info: Dist,
                    keep: int = 2) -> Path:
    """Write `checkpoints/step_NNNNNN/` atomically (temp dir, then rename) and point `latest` at it.

    Contents: HF-format weights + tokenizer (loadable by `from_pretrained`), and `trainer_state.pt`
    with the full optimizer state, every rank's RNG states, the step and `state` (data position and
    method state). Only the newest `keep` checkpoints are kept.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    # tied weights (e.g. lm_head = embed_tokens) appear under both names: keep the one module owns
    owned = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    model_state = {name: tensor for name, tensor in model_state.items() if name in owned}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if _distributed():
        rngs = [None] * dist_info.world_size
        dist.all_gather_object(rngs, rng)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    if dist_info.is_main:
        staging = root / f"step_{step:06d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        model.save_pretrained(staging, state_dict=model_state)
        tokenizer.save_pretrained(staging)
        torch.save({"step": step, "optimizer": optimizer_state, "rng": rngs, "state": state},
                   staging / "trainer_state.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        for old in sorted(root.glob("step_[0-9]*"))[:-keep] if keep > 0 else []:
            if not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "trainer_state.pt").exists() else None


def load_checkpoint(path: str | Path, model, optimizer, dist_info: Dist) -> dict:
    """Restore optimizer and RNG state from a checkpoint whose weights `model` was loaded from.
    Returns the trainer state (`step`, `state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    saved = torch.load(Path(path) / "trainer_state.pt", weights_only=False, mmap=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    rngs = saved["rng"]
    if len(rngs) != dist_info.world_size:
        print0(f"[resume] checkpoint was written by {len(rngs)} ranks, now {dist_info.world_size}: "
               "RNG streams differ, so results will not match an uninterrupted run exactly")
    rng = rngs[dist_info.rank % len(rngs)]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return {"step": saved["step"], "state": saved["state"]}
