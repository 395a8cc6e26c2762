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


# the first option of each script's --help: its method's own, before anything shared
FIRST_OPTION = {"antisd.py": "--lambda_max", "iw_opd.py": "--teacher_model", "paced.py": "--mode",
                "trace.py": "--route"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_the_script_does_then_lists_its_own_options_first(script, capsys, monkeypatch):
    import ast
    import dataclasses
    import importlib

    import common

    monkeypatch.setenv("COLUMNS", "100")
    module = importlib.import_module(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as stop:
        common.parse_args(module.Args, ["--help"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    summary = ast.get_docstring(ast.parse((ROOT / script).read_text())).split("\n\n")[0]
    blank = lines.index("")
    assert " ".join(lines[:blank]) == " ".join(summary.split())  # first, no usage line before it
    assert lines[blank + 1] == f"{script} options:"
    assert lines[blank + 2].startswith(f"  {FIRST_OPTION[script]} ")
    listed = [line.split()[0].rstrip(",") for line in lines if line.startswith("  -")]
    shared = [f"--{f.name}" for f in dataclasses.fields(common.RunOptions)]
    # a shared option a script re-declares (another default) stays with the shared ones
    own = [f"--{name}" for name in module.Args.__annotations__ if f"--{name}" not in shared]
    assert max(listed.index(flag) for flag in own) < min(listed.index(flag) for flag in shared)
    assert "shared options (common.RunOptions):" in lines
