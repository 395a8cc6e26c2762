"""The toy commands of README.md, then of tests/README.md, run top to bottom in a fresh directory, as
a new user types them after the quick start (with few steps and problems): no run name collides,
every training run saves its final weights, the eval command evaluates them, no library warning
reaches stderr, and every step line fits a 120-column terminal."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from conftest import ROOT, _exit_abort_only

SCRIPTS = ("antisd.py", "trace.py", "paced.py", "iw_opd.py")
READMES = (ROOT / "README.md", ROOT / "tests" / "README.md")
# blocks for GPUs, hub models, placeholders (<run>) or the test machinery
NOT_TOY = re.compile(r"Qwen|<[\w -]+>|export |tests/")
FEW = ["--num_steps", "2", "--num_problems", "4", "--max_new_tokens", "32", "--eval_limit", "2"]
# TRACE runs 4 steps: a failing annotator stops a run after --annotator_patience (3) steps
FEWER = {"antisd.py": ["--num_generations", "2"],
         "trace.py": ["--num_generations", "2", "--num_steps", "4"],
         "paced.py": ["--k", "2"], "iw_opd.py": []}
# all that may reach stderr: transformers' progress bars (loading a model, writing a checkpoint)
STDERR_OK = re.compile(r"(Loading weights|Writing model shards): +\d+%.*")


def readme_commands() -> list[tuple[dict, list[str]]]:
    """(environment, words) of every script command in the READMEs' toy bash blocks, in order."""
    commands = []
    text = "\n".join(readme.read_text() for readme in READMES)
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        if NOT_TOY.search(block):
            continue
        for part in block.replace("&&", "\n").splitlines():
            words, env = shlex.split(part, comments=True), {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if any(word in SCRIPTS for word in words) and words[0] in ("python", "torchrun"):
                commands.append((env, words))
    return commands


def test_readme_toy_commands_run_top_to_bottom(tmp_path):
    commands = readme_commands()
    launched = [next(w for w in words if w in SCRIPTS) for _, words in commands]
    assert set(launched) == set(SCRIPTS) and len(commands) >= 28
    assert sum("--eval_only" in words for _, words in commands) >= 1
    for script in ("common.py", *SCRIPTS):
        shutil.copy(ROOT / script, tmp_path / script)
    base_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a fresh shell
    run_dirs = []
    for env, words in commands:
        script = next(w for w in words if w in SCRIPTS)
        launcher = ([sys.executable] if words[0] == "python"
                    else [sys.executable, "-m", "torch.distributed.run", "--standalone"])
        args = launcher + words[1:] + FEW + FEWER[script]
        result = subprocess.run(args, cwd=tmp_path, env={**base_env, **env, "PYTHONUNBUFFERED": "1"},
                                capture_output=True, text=True, timeout=900)
        shown = f"{shlex.join(words)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        if not _exit_abort_only(args, result.stderr):  # (gloo's abort at exit: judged by its files)
            assert result.returncode == 0, shown
            noise = [line for line in re.split(r"[\r\n]+", result.stderr)
                     if line.strip() and not STDERR_OK.fullmatch(line.strip())]
            assert noise == [], shown
        steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
        assert all(len(line) <= 120 for line in steps), steps
        if "--eval_only" in words:  # the final weights of the run it names
            run = tmp_path / "runs" / words[words.index("--run_name") + 1]
            table = json.loads((run / "eval_table.json").read_text())
            assert (table["model"], table["step"]) == ("runs/first/checkpoints/step_000002", 2)
            continue
        n = 4 if script == "trace.py" else 2
        assert len(steps) == n, shown
        (summary,) = [line for line in result.stdout.splitlines()
                      if line.startswith(f"[{script[:-3]}] done: steps 0->{n} in ")]
        run = tmp_path / re.search(r"; runs dir (\S+);", summary)[1]
        final = run / "checkpoints" / f"step_{n:06d}"  # a Hugging Face folder, named by `latest`
        assert (final / "config.json").is_file() and any(final.glob("model*.safetensors")), shown
        assert (final.parent / "latest").read_text().strip() == final.name, shown
        run_dirs.append(run)
    assert len(set(run_dirs)) == len(run_dirs) == len(commands) - 1  # one new directory each

