"""Shared fixtures. The toy models are built once per machine (cached, see common.build_toy_model)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def require(module: str):
    """`module` imported, or: skipped on a user's machine, a failure in CI (`CI` set), where every
    optional component (vLLM's CPU build, TRL) is installed by .ci/run and must run."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get("CI", "") not in ("", "0", "false"):
            pytest.fail(f"CI must run this test but {module} does not import: {error}")
        pytest.skip(f"{module} not installed")


@pytest.fixture(scope="session")
def toy_tokenizer():
    import common

    return common.load_tokenizer("toy")


@pytest.fixture(scope="session")
def toy_model():
    import common

    return common.load_model("toy", common.init_distributed())


# torch 2.13's gloo on CPU sometimes aborts a rank *at interpreter exit*, after its work is done
# ("terminate called without an active exception"; reproduced 3 times in 14 two-rank runs on 2 busy
# cores, also with code that predates this repository's CUDA-path changes). torchrun then reports
# failure. Such a run is accepted here and judged by what it wrote: every torchrun test checks its
# ranks' markers, metrics or files after `run_script`, so an abort before the work was done still fails.
EXIT_ABORT = "terminate called without an active exception"


def _exit_abort_only(args, output: str) -> bool:
    return "torch.distributed.run" in args and EXIT_ABORT in output and "Traceback" not in output.split(EXIT_ABORT)[0]


def run_script(args, timeout=600, env=None, check=True):
    """Run a command from the repository root; return the CompletedProcess (stdout+stderr merged)."""
    merged_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, cwd=ROOT, env=merged_env, timeout=timeout, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if check and result.returncode != 0 and not _exit_abort_only(args, result.stdout):
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}")
    return result


def torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


# `python <this program> <module> <flags>`: runs `<module>.main(flags)`; rank 0 writes half of the
# trainer state of step $KILL_AT_STEP, then SIGKILLs itself inside that checkpoint write
KILL_DURING_SAVE = r"""
import importlib, os, signal, sys
import torch
sys.path.insert(0, os.getcwd())  # the repository (the command runs there)
kill_at, original = int(os.environ["KILL_AT_STEP"]), torch.save

def save_then_die(obj, path, *args, **kwargs):
    # rank 0 writes half of the trainer state of step `kill_at` (its weights export is complete),
    # then dies as if the machine went away
    if isinstance(obj, dict) and obj.get("step") == kill_at:
        original(obj, path, *args, **kwargs)
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, path, *args, **kwargs)

torch.save = save_then_die
importlib.import_module(sys.argv[1]).main(sys.argv[2:])
"""
