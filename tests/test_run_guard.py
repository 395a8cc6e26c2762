"""One writer per run directory and nothing lost to ordinary events: a second job on a run that is
training is refused naming the holder (a lock left by a dead process is taken over); torchrun ranks
die with their launcher; a resume by another script or with a method option changed is refused
before anything changes; SIGINT/SIGTERM, a full disk and a mistyped flag each end in one line."""

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import antisd
import common
import paced
import trace
from common import UserError
from conftest import ROOT, run_script, torchrun
from test_runs import FAST, records, snapshot, train


def start(args, env=None, output=subprocess.PIPE):
    """Start a command from the repository root in a session of its own (so a test can signal its
    whole process group, as a terminal or a scheduler does)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for_steps(run, count, process, timeout=240):
    """Wait until `run`/metrics.jsonl holds `count` records (the process must still be running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        if len([line for line in lines if line.endswith("}")]) >= count:
            return
        assert process.poll() is None, process.stdout.read()[-3000:] if process.stdout else "ended"
        time.sleep(0.2)
    raise AssertionError(f"no {count} steps in {timeout}s")


def living(pids):
    """The pids of `pids` that are still running (zombies count as ended)."""
    alive = []
    for pid in pids:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_second_job_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "r"
    args = FAST + ["--num_steps", "200", "--save_every", "1", "--output_dir", str(tmp_path),
                   "--run_name", "r"]
    first = start([sys.executable, "antisd.py", *args])
    try:
        wait_for_steps(run, 2, first)
        with pytest.raises(UserError) as error:  # a --resume while it trains
            antisd.main(args + ["--resume"])
        assert str(error.value).startswith(f"{run} is in use by another job (pid {first.pid} on "
                                           f"{socket.gethostname()}, since ")
        assert (f"antisd.py {shlex.join(args)}); nothing was changed. Let it finish or stop it "
                "first" in str(error.value))
        with pytest.raises(UserError, match=f"in use by another job \\(pid {first.pid} "):
            antisd.main(args + ["--overwrite"])
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert json.loads((run / ".lock").read_text())["pid"] == first.pid  # names a dead pid now
    step = int((run / "checkpoints" / "latest").read_text()[len("step_"):])
    train(tmp_path, "--resume", "--save_every", "1", steps=step + 1)  # taken over
    assert common.read_metrics(run)[-1]["step"] == step + 1
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


def test_torchrun_ranks_end_when_the_launcher_is_killed(tmp_path):
    marker = f"rlvr-orphan-test-{os.getpid()}"
    # output to a file: a pipe would reach its end only when the last rank is gone
    launcher = start(torchrun(2) + ["antisd.py", *FAST, "--num_steps", "500", "--output_dir",
                                    str(tmp_path), "--run_name", "t"],
                     env={"RLVR_TEST_MARKER": marker}, output=open(tmp_path / "output.txt", "w"))
    marked, ranks = [], []  # the ranks and their grader workers (forked: the same command line)
    try:
        wait_for_steps(tmp_path / "t", 1, launcher)
        for entry in os.listdir("/proc"):
            try:
                environ = open(f"/proc/{entry}/environ", "rb").read()
                command = open(f"/proc/{entry}/cmdline", "rb").read()
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            if (f"RLVR_TEST_MARKER={marker}".encode() in environ and b"antisd.py" in command
                    and b"torch.distributed.run" not in command):
                marked.append(int(entry))
                ranks += [int(entry)] if parent == launcher.pid else []
        assert len(ranks) == 2, (ranks, marked)
        os.killpg(launcher.pid, signal.SIGKILL)  # its process group; ranks have their own
        launcher.wait()
        deadline = time.time() + 20
        while living(marked) and time.time() < deadline:
            time.sleep(0.2)
        assert living(marked) == [], "ranks (or their grader workers) outlived their launcher"
    finally:
        for pid in living(marked):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A 2-step antisd.py run with a checkpoint at step 2."""
    root = tmp_path_factory.mktemp("made")
    train(root, "--save_every", "2")
    return root / "r"


def test_resume_by_another_script_or_method_is_refused_before_anything_changes(two_step_run,
                                                                               tmp_path):
    run = tmp_path / "r"
    shutil.copytree(two_step_run, run)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as error:
        paced.main(["--resume", "--output_dir", str(tmp_path), "--run_name", "r"])
    assert str(error.value) == (f"--resume: {run} was made by antisd.py, not paced.py; nothing "
                                "was changed. Continue it with antisd.py --resume, or start a new "
                                "run (a new --run_name).")
    assert snapshot(tmp_path) == before
    with pytest.raises(UserError) as error:
        train(tmp_path, "--resume", "--save_every", "2", "--lambda_max", "0.3", "--seed", "1",
              steps=3)
    assert str(error.value) == (
        f"--resume: --seed 1 (the run has 0), --lambda_max 0.3 (the run has 0.5): would change "
        f"what {run} trains (made by antisd.py); nothing was changed. Resume with the run's "
        "values, or start a new run (a new --run_name). Options a resume may change: README, "
        "'Runs and checkpoints'.")
    assert snapshot(tmp_path) == before
    config = (run / "config.json").read_bytes()
    # options that change only length, evaluation, logging or batching may change; they are recorded
    train(tmp_path, "--resume", "--save_every", "3", "--micro_batch_size", "8", "--eval_every", "1",
          steps=3)
    assert [r["step"] for r in records(run / "metrics.jsonl")] == [1, 2, 3]
    assert (run / "config.json").read_bytes() == config
    assert json.loads(config)["script"] == "antisd.py"
    (entry,) = records(run / "resumes.jsonl")
    assert entry["from_step"] == 2 and entry["changed"] == {
        "num_steps": [2, 3], "resume": [False, True], "eval_every": [30, 1], "save_every": [2, 3],
        "output_dir": [str(two_step_run.parent), str(tmp_path)], "micro_batch_size": [64, 8]}


def test_sigterm_ends_after_the_step_with_a_checkpoint_and_a_second_sigint_at_once(tmp_path):
    cases = [("graceful", signal.SIGTERM, 143), ("at_once", signal.SIGINT, 130)]
    for name, signum, status in cases:
        run = tmp_path / name
        slow = ["--num_problems", "32", "--max_new_tokens", "48"] if name == "at_once" else []
        every = [] if name == "graceful" else ["--save_every", "1"]  # graceful: the default, 0
        args = FAST + slow + ["--num_steps", "200", *every, "--output_dir", str(tmp_path),
                              "--run_name", name]
        process = start([sys.executable, "antisd.py", *args])
        notice = (f"[run] {signum.name}: stopping after this step and its checkpoint (send it "
                  "again to stop at once)\n")
        try:
            wait_for_steps(run, 2, process)
            logged = len((run / "metrics.jsonl").read_text().splitlines())
            os.killpg(process.pid, signum)  # as a terminal's Ctrl-C or a scheduler does
            if name == "at_once":  # mid-step, once the first is handled (two at once would merge)
                # unbuffered print writes a line's text and its newline apart: the notice may
                # land between them, at the end of a step's line
                while (line := process.stdout.readline()) and not line.endswith(notice):
                    pass
                assert line, "the process ended before the stop notice"
                os.killpg(process.pid, signum)
            output, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        assert process.returncode == status and "Traceback" not in output, output[-3000:]
        step = records(run / "metrics.jsonl")[-1]["step"]
        assert step <= logged + 1  # it ended with the step in progress (maybe already logged)
        checkpoint = common.latest_checkpoint(run)
        resume = f"python {shlex.join(['antisd.py', *args, '--resume'])}"
        if name == "graceful":  # the step in progress finished and was checkpointed (none due)
            assert checkpoint == run / "checkpoints" / f"step_{step:06d}" and notice in output
            assert output.endswith(f"stopped by SIGTERM after step {step}: last checkpoint "
                                   f"{checkpoint}; to continue: {resume}\n"), output[-2000:]
            assert f"[antisd] stopped: steps 0->{step} in " in output  # the summary, not "done"
            assert "[antisd] done:" not in output
        else:
            assert checkpoint is not None and output.endswith(
                f"stopped by SIGINT after step {step} (the step in progress was dropped): last "
                f"checkpoint {checkpoint}; to continue: {resume}\n"), output[-2000:]


def test_disk_full_in_a_checkpoint_or_metrics_is_one_error_naming_the_intact_checkpoint(tmp_path,
                                                                                      monkeypatch):
    """/dev/full fails every write with ENOSPC: the real writers (torch.save, a file) hit it."""
    run, checkpoints = tmp_path / "r", tmp_path / "r" / "checkpoints"
    original_save = torch.save

    def save_to_full_disk(obj, path, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            path = "/dev/full"
        return original_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_to_full_disk)
    with pytest.raises(UserError) as error:
        train(tmp_path, "--save_every", "2", steps=6)
    assert str(error.value).startswith(f"cannot write {checkpoints / 'step_000004'} (a file of it "
                                       "could not be written; ")
    assert str(error.value).endswith(f"MB free there); nothing was deleted, the last checkpoint "
                                     f"{checkpoints / 'step_000002'} is intact; free some space, "
                                     "then continue with --resume")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]  # no .tmp
    assert common.check_checkpoint(checkpoints / "step_000002") is None
    assert [r["step"] for r in records(run / "metrics.jsonl")] == [1, 2, 3, 4]
    monkeypatch.setattr(torch, "save", original_save)

    log = common.RunLogger.log

    def log_to_full_disk(self, step, metrics, prefix="step"):
        if step == 6:  # the disk fills up under metrics.jsonl
            (run / "metrics.jsonl").unlink()
            (run / "metrics.jsonl").symlink_to("/dev/full")
        return log(self, step, metrics, prefix)

    monkeypatch.setattr(common.RunLogger, "log", log_to_full_disk)
    with pytest.raises(UserError) as error:
        train(tmp_path, "--resume", "--save_every", "2", steps=6)
    assert str(error.value).startswith(f"cannot write {run / 'metrics.jsonl'} (No space left on "
                                       "device; ")
    assert str(error.value).endswith(f"the last checkpoint {checkpoints / 'step_000004'} is "
                                     "intact; free some space, then continue with --resume")


def test_unknown_flag_names_the_closest_known_one_in_one_line():
    result = run_script([sys.executable, "antisd.py", "--lamda_max", "0.3"], check=False)
    assert (result.returncode, result.stdout) == (
        2, "error: unknown option --lamda_max (did you mean --lambda_max?); `python antisd.py "
           "--help` lists every option\n")
    listing = "`python trace.py --help` lists every option"
    for argv, message in [
        (["--anotator", "oracle"],
         f"unknown option --anotator (did you mean --annotator?); {listing}"),
        (["--num-step=3"], f"unknown option --num-step (did you mean --num_steps?); {listing}"),
        (["--xyzzy", "1"], f"unknown option --xyzzy; {listing}"),
        (["oracle"], f"unexpected argument 'oracle': options are --name value pairs; {listing}"),
    ]:
        with pytest.raises(UserError) as error:
            trace.main(argv)
        assert str(error.value) == message
