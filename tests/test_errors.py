"""Every bad input gets a clear one-line error before anything heavy happens: validated options,
the entry point's one-line output (tracebacks only on request or for bugs), torchrun ranks that exit
instead of hanging, unreachable hub models and datasets, and prompts too long for the context."""

import dataclasses
import importlib.util
import json
import shutil
import sys
import time
import typing

import pytest

import antisd
import common
import iw_opd
import paced
import trace
from common import UserError
from conftest import run_script, torchrun

EVAL_K_RANGE = "an int >= 1, or empty for each benchmark's default"

# (flag, bad value, the valid range the message must state)
BAD_VALUES = [
    ("num_steps", "0", ">= 1"), ("seed", "-1", "in [0, 2147483647]"), ("num_problems", "0", ">= 1"),
    ("num_generations", "1", ">= 2 (GRPO's baseline is the group mean of at least 2 rollouts)"),
    ("max_new_tokens", "0", ">= 1"), ("max_prompt_tokens", "-1", ">= 0"), ("temperature", "-0.5", ">= 0"),
    ("top_p", "0", "in (0, 1]"), ("top_p", "1.5", "in (0, 1]"), ("top_k", "-1", ">= 0"),
    ("gen_batch_size", "0", ">= 1"), ("gen_batch_tokens", "-1", ">= 0"), ("micro_batch_tokens", "-1", ">= 0"),
    ("lr", "-1e-05", "> 0"), ("lr", "0", "> 0"), ("lr", "nan", "> 0"),
    ("lr", "inf", "> 0"), ("weight_decay", "-0.1", ">= 0"), ("max_grad_norm", "0", "> 0"),
    ("clip_low", "1.5", "in [0, 1]"), ("clip_high", "-0.1", ">= 0"), ("num_minibatches", "0", ">= 1"),
    ("micro_batch_size", "0", ">= 1"), ("logprob_chunk_size", "0", ">= 1"), ("lambda_max", "-0.5", ">= 0"),
    ("gate_warmup", "-1", ">= 0"), ("tau_down", "0", "in (0, 1]"), ("tau_down", "1.2", "in (0, 1]"),
    ("eval_every", "-1", ">= 0"), ("eval_k", "0", EVAL_K_RANGE), ("eval_k", "x", EVAL_K_RANGE),
    ("eval_limit", "-1", ">= 0"),
    ("eval_temperature", "-1", ">= 0"), ("eval_top_p", "0", "in (0, 1]"), ("eval_top_k", "-2", ">= 0"),
    ("save_every", "-1", ">= 0"), ("grader_timeout", "0", "> 0"), ("grader_timeout", "-3", "> 0"),
    ("rollout", "sglang", "one of auto, vllm, hf"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load a tokenizer, model or dataset fails the test: validation must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("something was loaded before the options were validated")

    for name in ["load_tokenizer", "load_model", "load_run_problems", "prepare_run_dir", "init_distributed"]:
        monkeypatch.setattr(common, name, refuse)


@pytest.mark.parametrize("flag,value,valid", BAD_VALUES, ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_each_option_is_validated_before_anything_loads(no_loading, flag, value, valid):
    with pytest.raises(UserError) as error:
        antisd.main([f"--{flag}={value}"])
    shown = str(float(value)) if isinstance(getattr(antisd.Args, flag), float) else value
    assert str(error.value) == f"--{flag} {shown}: must be {valid}"


@pytest.mark.parametrize("script", [antisd, iw_opd, paced, trace])
def test_every_numeric_option_has_a_rule(script):
    rules = {**common.ARG_RULES, **script.RULES}
    hints = typing.get_type_hints(script.Args)
    numeric = {f.name for f in dataclasses.fields(script.Args) if hints[f.name] in (int, float)}
    assert numeric - rules.keys() == set()
    fields = {f.name for f in dataclasses.fields(script.Args)}
    assert set(script.RULES) <= fields  # a misspelt rule would never apply


# the other scripts' own options: (script, flag, bad value, the valid range the message states)
METHOD_BAD_VALUES = [
    (iw_opd, "gamma", "-0.5", ">= 0"), (iw_opd, "num_rollouts", "0", ">= 1"),
    (iw_opd, "picture_rollouts", "-1", ">= 0"), (iw_opd, "clip_low", "2", "in [0, 1]"),
    (paced, "k", "0", ">= 1"), (paced, "alpha", "-1", ">= 0"), (paced, "log_snr", "-1", ">= 0"),
]


@pytest.mark.parametrize("script,flag,value,valid", METHOD_BAD_VALUES,
                         ids=[f"{s.__name__}-{f}={v}" for s, f, v, _ in METHOD_BAD_VALUES])
def test_method_options_are_validated_before_anything_loads(no_loading, script, flag, value,
                                                            valid):
    with pytest.raises(UserError) as error:
        script.main([f"--{flag}={value}"])
    shown = str(float(value)) if isinstance(getattr(script.Args, flag), float) else value
    assert str(error.value) == f"--{flag} {shown}: must be {valid}"


def test_cross_option_errors(tmp_path):
    for flags, message in [
        (["--num_minibatches", "3"], "--num_minibatches 3 must divide the 256 rollouts per rank."),
        (["--gate_warmup", "0"], "--gate entropy needs --gate_warmup >= 1"),
        (["--max_new_tokens", "1024"], "--max_new_tokens 1024 leaves no room for a prompt in the context of "
                                       "--model 'toy' (1024 tokens)"),
        (["--model", "gpt-5"], "Unknown --model 'gpt-5'"),
    ]:
        with pytest.raises(UserError) as error:
            antisd.main(flags + ["--output_dir", str(tmp_path), "--run_name", "x"])
        assert str(error.value).startswith(message), str(error.value)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_track_without_wandb(no_loading):
    with pytest.raises(UserError, match=r"^--track logs to Weights & Biases: pip install wandb"):
        antisd.main(["--track"])


def test_user_error_is_one_line_without_traceback():
    result = run_script([sys.executable, "antisd.py", "--eval_k", "0"], check=False)
    assert (result.returncode, result.stdout) == (2, f"error: --eval_k 0: must be {EVAL_K_RANGE}\n")
    for debug in [{"env": {"RLVR_DEBUG": "1"}}, {"args": ["--debug"]}]:
        result = run_script([sys.executable, "antisd.py", "--eval_k", "0", *debug.get("args", [])],
                            env=debug.get("env"), check=False)
        assert result.returncode == 1 and "Traceback (most recent call last)" in result.stdout
        assert result.stdout.rstrip().endswith(f"common.UserError: --eval_k 0: must be {EVAL_K_RANGE}")


def test_a_bug_keeps_its_traceback():
    code = "import common\ndef main():\n    return {}['missing']\ncommon.run_main(main)"
    result = run_script([sys.executable, "-c", code], check=False)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stdout
    assert result.stdout.rstrip().endswith("KeyError: 'missing'")


@pytest.mark.parametrize("flags,message", [
    (["--eval_k", "0"], f"--eval_k 0: must be {EVAL_K_RANGE}"),  # before the process group starts
    (["--num_problems", "3"], "--num_problems 3 does not divide over 2 ranks"),  # after
])
def test_torchrun_user_error_exits_on_both_ranks_promptly(tmp_path, flags, message):
    started = time.time()
    result = run_script(torchrun(2) + ["antisd.py", *flags, "--output_dir", str(tmp_path)], check=False, timeout=120)
    assert result.returncode != 0 and time.time() - started < 120
    for rank in [0, 1]:
        assert f"[rank {rank}] error: {message}" in result.stdout
    assert "[rank0]: Traceback" not in result.stdout and "[rank1]: Traceback" not in result.stdout
    assert list(tmp_path.iterdir()) == []  # refused before the run directory was made


ONE_RANK_FAILS = """
import sys
sys.path.insert(0, ".")
import common

def main():
    dist_info = common.init_distributed()
    if dist_info.rank == 1:
        raise common.UserError("only rank 1 finds this problem")
    common.barrier()  # rank 0 waits for rank 1, which never comes
    print("rank 0 got past the barrier", flush=True)

common.run_main(main)
"""


def test_torchrun_error_on_one_rank_does_not_hang_the_other(tmp_path):
    script = tmp_path / "one_rank_fails.py"
    script.write_text(ONE_RANK_FAILS)
    started = time.time()
    result = run_script(torchrun(2) + [str(script)], check=False, timeout=150)
    assert result.returncode != 0 and time.time() - started < 150
    assert "[rank 1] error: only rank 1 finds this problem" in result.stdout
    assert "rank 0 got past the barrier" not in result.stdout


def test_unreachable_hub_model_and_dataset_fail_fast_naming_the_id(tmp_path):
    """With HF_HUB_OFFLINE=1 the hub is never asked: one line naming the id and the fix."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "", "HF_HOME": str(tmp_path / "hf")}
    cases = [(["--model", "rlvr-test-nobody/no-such-model"],
              "error: --model 'rlvr-test-nobody/no-such-model': cannot load 'rlvr-test-nobody/no-such-model' "
              "from the Hugging Face hub"),
             (["--dataset", "rlvr-test-nobody/no-such-dataset"],
              "error: Cannot load dataset 'rlvr-test-nobody/no-such-dataset' (split 'train') from the Hugging "
              "Face hub")]
    for flags, start in cases:
        started = time.time()
        result = run_script([sys.executable, "antisd.py", *flags, "--output_dir", str(tmp_path), "--run_name", "h"],
                            env=env, check=False, timeout=120)
        lines = [line for line in result.stdout.splitlines() if line.startswith("error:")]
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), result.stdout[-3000:]
        assert "It needs network access or a local copy" in lines[0] and "Traceback" not in result.stdout
        assert time.time() - started < 40, "retried the hub instead of failing fast"


def test_megabyte_problem_is_skipped_and_training_runs(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"Compute {i}+{i}.", "answer": str(2 * i)} for i in range(4)]
    rows.insert(2, {"problem": "Compute " + "1+" * 500_000 + "1.", "answer": "500001"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    antisd.main(["--dataset", str(data), "--num_steps", "1", "--num_problems", "4", "--num_generations", "2",
                 "--eval_dataset", "", "--max_new_tokens", "24", "--output_dir", str(tmp_path), "--run_name", "m"])
    out = capsys.readouterr().out
    assert "skipped 0 rows without an answer, 0 malformed rows and 1 prompts longer than 1000 tokens" in out
    assert f"[data] {data} (train): 4 problems" in out


def test_local_model_folder_with_broken_weights(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(common.build_toy_model("toy"), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=rf"^--model '{folder}': cannot load the model folder {folder}: Error while "
                                        "deserializing header"):
        antisd.main(["--model", str(folder), "--output_dir", str(tmp_path), "--run_name", "w"])


@pytest.mark.parametrize("script", [iw_opd, paced])
def test_teacher_with_another_tokenizer_is_refused_before_weights_load(script, tmp_path,
                                                                      monkeypatch):
    teacher = tmp_path / "teacher"
    shutil.copytree(common.build_toy_model("toy-large"), teacher)
    tokenizer = common.load_tokenizer(str(teacher))
    tokenizer.add_tokens(["zebra"])
    tokenizer.save_pretrained(teacher)
    monkeypatch.setattr(common, "load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    flags = ["--teacher_model", str(teacher), "--output_dir", str(tmp_path)]
    with pytest.raises(UserError, match="different tokenizer") as error:
        script.main(flags + ["--run_name", "t"])
    assert "zebra" in str(error.value)
    result = run_script([sys.executable, f"{script.__name__}.py", *flags, "--run_name", "u"],
                        check=False)
    assert result.returncode == 2 and "error: --teacher_model" in result.stdout
    assert "Traceback" not in result.stdout
