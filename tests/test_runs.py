"""Run directories and checkpoints never lose data: a used run directory is refused without --resume,
--resume takes the newest complete checkpoint (or refuses), metrics are only appended to (a resume
marker supersedes the records after its checkpoint), rotation goes by step number, and a SIGKILL
during a checkpoint write is survived."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import antisd
import common
from common import UserError
from conftest import KILL_DURING_SAVE, ROOT, run_script

FAST = ["--num_problems", "4", "--num_generations", "4", "--eval_dataset", "", "--max_new_tokens", "24"]
TIMING = {"step_seconds", "tokens_per_second"}


def snapshot(root):
    """Every path under `root` with the sha256 of its bytes (None for a directory)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def raw_records(run):
    """Every line of `run`/metrics.jsonl, superseded records and resume markers included."""
    return records(run / "metrics.jsonl")


def untimed(record):
    return {k: v for k, v in record.items() if k not in TIMING}


def train(tmp_path, *flags, steps=2):
    return antisd.main(FAST + ["--num_steps", str(steps), "--output_dir", str(tmp_path), "--run_name", "r", *flags])


def test_rerun_without_resume_is_refused_and_changes_nothing(tmp_path):
    train(tmp_path, "--save_every", "1")
    before = snapshot(tmp_path)
    assert "r/checkpoints/step_000002/trainer_state.pt" in before and "r/metrics.jsonl" in before
    with pytest.raises(UserError, match=r"already holds a run \(2 metric records, 2 checkpoints\); nothing was "
                                        r"changed\. Pass --resume .* a new --run_name, or --overwrite"):
        train(tmp_path, "--save_every", "1")
    with pytest.raises(UserError, match="already holds a run"):  # a metrics-only run counts as well
        antisd.main(["--eval_only", "--eval_limit", "2", "--output_dir", str(tmp_path), "--run_name", "r"])
    assert snapshot(tmp_path) == before
    # --overwrite moves the old run aside, byte for byte, and starts a new one
    train(tmp_path, "--overwrite", steps=1)
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert snapshot(aside) == {k[len("r/"):]: v for k, v in before.items() if k.startswith("r/")}
    assert [r["step"] for r in records(tmp_path / "r" / "metrics.jsonl")] == [1]
    with pytest.raises(UserError, match="pass only one of them"):
        train(tmp_path, "--overwrite", "--resume")


def test_a_run_saves_its_final_weights_and_eval_only_resume_evaluates_them(tmp_path):
    train(tmp_path, "--lambda_max", "0")  # no --save_every
    final = tmp_path / "r" / "checkpoints" / "step_000002"
    assert sorted(p.name for p in final.parent.iterdir()) == ["latest", "step_000002"]
    assert common.check_checkpoint(final) is None
    # no need to repeat the run's options (--lambda_max 0, FAST): it only evaluates
    antisd.main(["--eval_only", "--resume", "--run_name", "r", "--output_dir", str(tmp_path),
                 "--eval_limit", "2"])
    table = json.loads((tmp_path / "r" / "eval_table.json").read_text())
    assert (table["model"], table["step"]) == (str(final), 2)
    assert [(r["step"], "eval/toy/avg@4" in r) for r in records(tmp_path / "r" / "metrics.jsonl")
            ] == [(1, False), (2, False), (2, True)]


def test_default_run_names_hold_the_start_time_and_resume_needs_a_run_name(tmp_path, monkeypatch):
    monkeypatch.setattr(common.time, "strftime", lambda fmt, *t: "20260102-153000")
    for _ in range(2):  # two runs in the same second
        antisd.main(FAST + ["--num_steps", "1", "--output_dir", str(tmp_path)])
    antisd.main(FAST + ["--num_steps", "1", "--output_dir", str(tmp_path), "--lambda_max", "0"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "antisd_toy_s0_20260102-153000", "antisd_toy_s0_20260102-153000-2",
        "antisd_toy_s0_20260102-153000-3"]
    with pytest.raises(UserError) as error:
        antisd.main(FAST + ["--resume", "--output_dir", str(tmp_path)])
    newest = max(tmp_path.iterdir(), key=lambda path: path.stat().st_mtime).name
    assert str(error.value) == (
        "--resume continues the run named by --run_name (a default name holds its start time, so "
        f"each new run gets its own): pass --run_name {newest} (the newest antisd_toy_s0 run under "
        f"{tmp_path})")


def test_resume_without_checkpoint_refuses_and_keeps_metrics_byte_identical(tmp_path):
    train(tmp_path)
    shutil.rmtree(tmp_path / "r" / "checkpoints")  # metrics but no checkpoint (e.g. deleted)
    before = snapshot(tmp_path)
    metrics = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match=r"--resume: no valid checkpoint under .*checkpoints \(there are none\); "
                                        r"nothing was changed\. Pass --resume_or_start"):
        train(tmp_path, "--resume")
    assert snapshot(tmp_path) == before and (tmp_path / "r" / "metrics.jsonl").read_bytes() == metrics
    with pytest.raises(UserError, match="there is no run directory"):
        antisd.main(FAST + ["--output_dir", str(tmp_path), "--run_name", "other", "--resume"])
    assert snapshot(tmp_path) == before
    # --resume_or_start restarts in place: the old records stay, byte for byte, superseded
    train(tmp_path, "--resume_or_start", steps=1)
    marker = b'{"resumed_from_step": -1}\n'
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes().startswith(metrics + marker)
    assert [r["step"] for r in common.read_metrics(tmp_path / "r")] == [1]


def break_checkpoint(path, how):
    if how == "folder gone":  # `latest` still names it
        shutil.rmtree(path)
    else:
        (path / how).unlink()


NEEDED = ["trainer_state.pt", "model.safetensors", "train_state/.metadata", "config.json"]
REASONS = {name: f"{name} is missing" for name in NEEDED}


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A 3-step run with a checkpoint every step (rotation keeps steps 2 and 3)."""
    root = tmp_path_factory.mktemp("ckpt")
    train(root, "--save_every", "1", steps=3)
    return root / "r"


@pytest.mark.parametrize("how", list(REASONS))
def test_check_checkpoint_names_what_is_missing(three_checkpoints, tmp_path, how):
    copy = tmp_path / "step_000003"
    shutil.copytree(three_checkpoints / "checkpoints" / "step_000003", copy)
    assert common.check_checkpoint(copy) is None
    break_checkpoint(copy, how)
    assert common.check_checkpoint(copy).startswith(REASONS[how])


@pytest.mark.parametrize("how", ["trainer_state.pt", "folder gone"])
def test_resume_skips_a_broken_newest_checkpoint(three_checkpoints, tmp_path, capsys, how):
    run = tmp_path / "r"
    shutil.copytree(three_checkpoints, run)
    original = records(run / "metrics.jsonl")
    break_checkpoint(run / "checkpoints" / "step_000003", how)
    capsys.readouterr()
    train(tmp_path, "--resume", "--save_every", "1", steps=4)
    out = capsys.readouterr().out
    assert f"[resume] resuming from {run / 'checkpoints' / 'step_000002'} (step 2)" in out
    if how != "folder gone":
        assert "(skipped newer: step_000003: trainer_state.pt is missing)" in out
    # steps 3 and 4 were trained again from step 2's state: step 3 is the same as before (exact resume)
    logged = common.read_metrics(run)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert untimed(logged[2]) == untimed(original[2]) and logged[:2] == original[:2]
    # the replaced record is kept, not dropped: superseded by the resume's marker
    assert raw_records(run)[:4] == [*original, {"resumed_from_step": 2}]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000004"]
    assert common.check_checkpoint(run / "checkpoints" / "step_000003") is None  # rewritten, valid
    # config.json keeps what made the run; the resume and the options it changed go to resumes.jsonl
    assert json.loads((run / "config.json").read_text())["num_steps"] == 3
    (entry,) = records(run / "resumes.jsonl")
    assert entry["from_step"] == 2 and entry["changed"] == {
        "num_steps": [3, 4], "resume": [False, True],
        "output_dir": [str(three_checkpoints.parent), str(tmp_path)]}


def test_resume_with_every_checkpoint_broken_is_refused(three_checkpoints, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(three_checkpoints, run)
    break_checkpoint(run / "checkpoints" / "step_000003", "model.safetensors")
    break_checkpoint(run / "checkpoints" / "step_000002", "trainer_state.pt")
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=r"no valid checkpoint under .* \(step_000003: model.safetensors "
                                        r"is missing; step_000002: trainer_state.pt is missing\); "
                                        r"nothing was changed"):
        train(tmp_path, "--resume", steps=4)
    assert snapshot(tmp_path) == before


def test_rotation_orders_by_step_number_and_keeps_the_new_checkpoint(tmp_path, toy_tokenizer):
    from transformers import AutoModelForCausalLM

    dist_info = common.init_distributed()
    model = AutoModelForCausalLM.from_pretrained(common.build_toy_model("toy"))
    optimizer = torch.optim.AdamW(model.parameters())
    root = tmp_path / "checkpoints"

    def save(step, keep=2):
        common.save_checkpoint(tmp_path, step, model, toy_tokenizer, optimizer, {}, dist_info, keep=keep)
        assert (root / "latest").read_text() == f"step_{step:06d}"
        return sorted(p.name for p in root.iterdir() if p.name != "latest")

    for step in [3, 4]:  # a previous run's checkpoints
        save(step)
    assert save(1) == ["step_000001", "step_000003", "step_000004"]  # never the one just written
    assert save(2) == ["step_000001", "step_000002", "step_000003", "step_000004"]
    assert save(5) == ["step_000004", "step_000005"]
    assert save(999999) == ["step_000005", "step_999999"]
    assert save(1000000) == ["step_1000000", "step_999999"]  # by number: 999999 is older
    assert save(1000001, keep=1) == ["step_1000001"]
    assert [s for s, _ in common.list_checkpoints(tmp_path)] == [1000001]




def test_sigkill_during_checkpoint_write_then_resume(tmp_path):
    args = FAST + ["--num_steps", "6", "--save_every", "2", "--output_dir", str(tmp_path), "--run_name", "k"]
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, "antisd", *args], cwd=ROOT, env={
        **__import__("os").environ, "KILL_AT_STEP": "4"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600)
    assert killed.returncode == -9, killed.stdout[-2000:]
    run = tmp_path / "k"
    assert (run / "checkpoints" / "step_000004.tmp").exists() and (run / "checkpoints" / "latest").read_text() == \
        "step_000002"
    before = records(run / "metrics.jsonl")
    assert [r["step"] for r in before] == [1, 2, 3, 4]
    resumed = run_script([sys.executable, "antisd.py", *args, "--resume"])
    # the half-written step_000004.tmp is not a checkpoint at all (not even a skipped one)
    assert f"[resume] resuming from {run / 'checkpoints' / 'step_000002'} (step 2)\n" in resumed.stdout
    after = common.read_metrics(run)
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert [untimed(r) for r in after[:4]] == [untimed(r) for r in before]  # steps 3, 4 re-run identically
    assert raw_records(run)[:5] == [*before, {"resumed_from_step": 2}]  # appended, not rewritten
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_000004", "step_000006"]


def test_a_resume_appends_after_a_cut_line_and_readers_take_the_run_as_it_stands(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    config = {"script": "antisd.py", **common._config_values(antisd.Args())}
    (run / "config.json").write_text(json.dumps(config))
    lines = ['{"step": 0, "eval/avg@4": 0.2}', '{"step": 1, "reward": 0.1}', '{"step": 2, "reward": 0.3}',
             '{"step": 3, "rew']  # a record cut by a kill
    (run / "metrics.jsonl").write_text("\n".join(lines))
    logger = common.RunLogger(run, antisd.Args(), common.init_distributed(), resume_step=1)
    logger.log(2, {"reward": 0.5})
    logger.log(3, {"reward": 0.6})
    logger.close()
    appended = ['{"resumed_from_step": 1}', '{"step": 2, "reward": 0.5}', '{"step": 3, "reward": 0.6}']
    assert (run / "metrics.jsonl").read_text() == "\n".join(lines + appended) + "\n"
    assert common.read_metrics(run) == [json.loads(line) for line in lines[:2]] + [
        {"step": 2, "reward": 0.5}, {"step": 3, "reward": 0.6}]
    (entry,) = records(run / "resumes.jsonl")
    assert entry["from_step"] == 1 and entry["changed"] == {}
    # a restart in place (-1) supersedes every earlier record; a clean resume writes no marker
    logger = common.RunLogger(run, antisd.Args(), common.init_distributed(), resume_step=-1)
    logger.log(1, {"reward": 0.7})
    logger.close()
    logger = common.RunLogger(run, antisd.Args(), common.init_distributed(), resume_step=1)
    logger.log(2, {"reward": 0.8})
    logger.close()
    assert common.read_metrics(run) == [{"step": 1, "reward": 0.7}, {"step": 2, "reward": 0.8}]
    assert (run / "metrics.jsonl").read_text().endswith(
        '{"resumed_from_step": -1}\n{"step": 1, "reward": 0.7}\n{"step": 2, "reward": 0.8}\n')


def test_output_dir_and_run_name_errors(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    for flags, message in [
        (["--output_dir", str(afile)], f"--output_dir '{afile}' is a file, not a directory"),
        (["--output_dir", str(afile / "sub")], f"--output_dir '{afile / 'sub'}': cannot write the run directory"),
        (["--output_dir", "/proc/rlvr-test"], "--output_dir '/proc/rlvr-test': cannot write the run directory"),
        (["--output_dir", str(tmp_path), "--run_name", "a/b"], "--run_name 'a/b': must be a plain directory name"),
    ]:
        with pytest.raises(UserError) as error:
            antisd.main(FAST + flags)
        assert str(error.value).startswith(message), str(error.value)


def test_torchrun_refusal_and_resume_on_two_ranks(tmp_path):
    """Rank 0 decides about the run directory and every rank gets the same answer or error."""
    from conftest import torchrun

    args = ["antisd.py", *FAST, "--output_dir", str(tmp_path), "--run_name", "d", "--save_every", "2"]
    antisd.main(args[1:] + ["--num_steps", "2"])  # one process is quicker; a 2-rank run resumes it below
    before = snapshot(tmp_path)
    refused = run_script(torchrun(2) + args + ["--num_steps", "2"], check=False, timeout=120)
    assert refused.returncode != 0
    for rank in [0, 1]:
        assert f"[rank {rank}] error: {tmp_path / 'd'} already holds a run (2 metric records, 1 checkpoints)" \
            in refused.stdout
    assert snapshot(tmp_path) == before
    resumed = run_script(torchrun(2) + args + ["--num_steps", "3", "--resume"])
    assert f"[resume] resuming from {tmp_path / 'd' / 'checkpoints' / 'step_000002'} (step 2)" in resumed.stdout
    assert [r["step"] for r in records(tmp_path / "d" / "metrics.jsonl")] == [1, 2, 3]


def test_cpu_runs_default_to_one_torch_thread_unless_omp_num_threads_is_set():
    code = ("import torch; default = torch.get_num_threads(); import common; "
            "common.init_distributed(); print(default, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    default, chosen = result.stdout.splitlines()[-1].split()
    notice = "[run] CPU: 1 torch thread (OMP_NUM_THREADS=N python ... uses N)"
    assert chosen == "1" and (notice in result.stdout) == (int(default) > 1), result.stdout
    env["OMP_NUM_THREADS"] = "2"  # the user's choice stays
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True)
    assert result.stdout.split() == ["2", "2"] and result.stderr == ""
