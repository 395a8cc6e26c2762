"""Every method script runs under a profiler and a debugger, which execute it as `__main__` in a
namespace of their own (so its argument types must resolve without `sys.modules["__main__"]`)."""

import subprocess
import sys

import pytest

from conftest import ROOT, run_script

SCRIPTS = sorted(path.name for path in ROOT.glob("*.py") if path.name != "common.py")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_under_cprofile(script, tmp_path):
    result = run_script([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "profile"), script, "--help"])
    assert "--num_steps" in result.stdout and (tmp_path / "profile").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_under_pdb(script):
    result = subprocess.run([sys.executable, "-m", "pdb", script, "--help"], cwd=ROOT, input="continue\nquit\n",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert "--num_steps" in result.stdout and "Traceback" not in result.stdout
