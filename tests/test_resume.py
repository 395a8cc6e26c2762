"""Resume is exact for every script: after a clean stop, after a SIGKILL inside a checkpoint write
(the metrics of that step already written), on 1 rank and on 2 (torchrun), every logged value but
the timings and the weights equal those of an uninterrupted run. TRACE runs its KL channel
(`--route rkl_error`) with a frozen teacher refreshed every 3 steps, and resumes between refreshes
(steps 1 and 2), where the teacher copy must come from the checkpoint; its counters are compared."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from common import read_metrics as records
from conftest import KILL_DURING_SAVE, ROOT, run_script, torchrun

TIMING = {"step_seconds", "tokens_per_second", "time"}
TINY = ["--num_problems", "4", "--max_new_tokens", "24", "--eval_dataset", ""]
FLAGS = {
    "antisd": [*TINY, "--num_generations", "4"],
    "paced": [*TINY, "--k", "4", "--weighting", "none"],
    "iw_opd": [*TINY],
    "trace": [*TINY, "--num_generations", "4", "--route", "rkl_error", "--annotator", "oracle",
              "--teacher_context", "label+solution", "--kl_hold", "2", "--kl_end", "8",
              "--teacher_sync_every", "3"],
}
# the toy's test split, evaluated at the start and the end: a clean stop evaluates where the
# uninterrupted run does not, and the evaluation must not move the training's random streams
EVAL = ["--eval_dataset", "toy", "--eval_limit", "2", "--eval_k", "1", "--eval_every", "0"]



def untimed(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_records(expected, actual):
    """Every value equal (NaN equal to NaN), every key present in both."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for a, b in zip(untimed(expected), untimed(actual)):
        assert a.keys() == b.keys()
        differ = {k: (a[k], b[k]) for k in a if not (a[k] == b[k] or both_nan(a[k], b[k]))}
        assert not differ, f"step {a['step']}: {differ}"


def both_nan(a, b):
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def assert_same_weights(expected, actual):
    a, b = load_file(str(expected)), load_file(str(actual))
    assert a.keys() == b.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    assert not differ, differ


def weights(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"


def killed_in_save(launcher, tmp_path, script, flags, kill_at):
    """`script` with `flags` under `launcher` (python, torchrun), killed in checkpoint `kill_at`."""
    program = tmp_path / "kill_during_save.py"
    program.write_text(KILL_DURING_SAVE)
    result = subprocess.run([*launcher, str(program), script, *flags], cwd=ROOT,
                            env={**os.environ, "KILL_AT_STEP": str(kill_at)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=900)
    if launcher[0] == sys.executable and len(launcher) == 1:
        assert result.returncode == -9 and "Traceback" not in result.stdout, result.stdout[-3000:]
    else:  # torchrun reports rank 0's death (and rank 1's lost peer) with tracebacks of its own
        assert "failed (exitcode: -9) local_rank: 0" in result.stdout, result.stdout[-3000:]
    return result


@pytest.mark.parametrize("script", list(FLAGS))
def test_resume_is_exact_on_one_rank(script, tmp_path):
    """Uninterrupted (4 steps); stopped cleanly after step 2, then resumed; killed inside the write
    of checkpoint 2 (resumes from step 1). Evaluation at the start and the end of each run."""
    module = __import__(script)
    flags = [*FLAGS[script], *EVAL, "--save_every", "1", "--output_dir", str(tmp_path)]
    module.main([*flags, "--num_steps", "4", "--run_name", "straight"])
    module.main([*flags, "--num_steps", "2", "--run_name", "stopped"])
    module.main([*flags, "--num_steps", "4", "--run_name", "stopped", "--resume"])
    killed_in_save([sys.executable], tmp_path, script,
                   [*flags, "--num_steps", "4", "--run_name", "killed"], 2)
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text() == "step_000001"
    module.main([*flags, "--num_steps", "4", "--run_name", "killed", "--resume"])
    straight = records(tmp_path / "straight")
    training = [r for r in straight if "reward" in r]
    assert len(training) == 4 and len(straight) == 6  # 4 steps, evaluations at steps 0 and 4
    for name in ("stopped", "killed"):
        resumed = [r for r in records(tmp_path / name)  # less the stopped run's end-of-run eval
                   if not (name == "stopped" and r["step"] == 2 and "reward" not in r)]
        assert_same_records(straight, resumed)
        assert_same_weights(weights(tmp_path / "straight", 4), weights(tmp_path / name, 4))
    if script == "trace":  # the KL channel ran, and the teacher was refreshed at steps 0 and 3 only
        assert all(r["kl_loss"] > 0 for r in training)
        assert [r["teacher_refreshes"] for r in training] == [1, 1, 1, 2]


@pytest.mark.parametrize("script", list(FLAGS))
def test_resume_is_exact_on_two_ranks(script, tmp_path):
    """torchrun, 2 ranks, 3 steps, killed inside the write of checkpoint 3 after step 3's metrics
    and weights export: that run is the uninterrupted reference. Resumed from step 2, step 3 is
    trained again; and a run stopped cleanly after step 2, then resumed to step 3. Both must equal
    the reference. Evaluation at the start and the end of each run."""
    flags = [*FLAGS[script], *EVAL, "--save_every", "1", "--output_dir", str(tmp_path)]
    run = tmp_path / "killed"
    killed_in_save(torchrun(2), tmp_path, script,
                   [*flags, "--num_steps", "3", "--run_name", "killed"], 3)
    reference = records(run)
    assert [r["step"] for r in reference] == [0, 1, 2, 3, 3]  # evaluations at steps 0 and 3
    staged = tmp_path / "step3.safetensors"
    shutil.copy(run / "checkpoints" / "step_000003.tmp" / "model.safetensors", staged)
    resumed = run_script(torchrun(2) + [f"{script}.py", *flags, "--num_steps", "3", "--run_name",
                                        "killed", "--resume"], timeout=900)
    assert f"[resume] resuming from {run / 'checkpoints' / 'step_000002'} (step 2)" \
        in resumed.stdout
    assert_same_records(reference, records(run))
    assert_same_weights(staged, weights(run, 3))
    for steps, extra in (("2", []), ("3", ["--resume"])):
        run_script(torchrun(2) + [f"{script}.py", *flags, "--num_steps", steps, "--run_name",
                                  "stopped", *extra], timeout=900)
    stopped = [r for r in records(tmp_path / "stopped")  # less its end-of-run eval at step 2
               if not (r["step"] == 2 and "reward" not in r)]
    assert_same_records(reference, stopped)
    assert_same_weights(staged, weights(tmp_path / "stopped", 3))
    if script == "trace":
        training = [r for r in reference if "reward" in r]
        assert [r["teacher_refreshes"] for r in training] == [1, 1, 1]
        assert training[2]["kl_loss"] > 0
