"""Shared fixtures. The toy models are built once per machine (cached, see common.build_toy_model)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def toy_tokenizer():
    import common

    return common.load_tokenizer("toy")


@pytest.fixture(scope="session")
def toy_model():
    import common

    return common.load_model("toy", common.init_distributed())


def run_script(args, timeout=600, env=None, check=True):
    """Run a command from the repository root; return the CompletedProcess (stdout+stderr merged)."""
    merged_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(args, cwd=ROOT, env=merged_env, timeout=timeout, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n{result.stdout[-4000:]}")
    return result


def torchrun(nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
