"""tests/gpu_smoke.py, the GPU smoke command, run on CPU with tiny shapes, so that the command a
GPU session will run has run here too: every check in its own process, one JSON line each, the
summary table, a timed-out check recorded without losing the others."""

import json
import sys

from conftest import run_script

import gpu_smoke

SMOKE = [sys.executable, "tests/gpu_smoke.py", "--device", "cpu"]


def records(path):
    return {r["check"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_every_check_runs_on_cpu(tmp_path):
    out = tmp_path / "smoke.jsonl"
    result = run_script([*SMOKE, "--out", str(out), "--deadline", "200"], timeout=400)
    found = records(out)
    assert list(found) != [] and sorted(found) == sorted(gpu_smoke.CHECKS)
    for name, record in found.items():
        want = "skip" if name in gpu_smoke.CPU_SKIPS else "pass"
        assert record["status"] == want and record["device"] == "cpu", (name, record)
    assert found["script-trace"]["reason"].startswith("CPU: antisd stands for the four")
    script = found["script-antisd"]["figures"]
    assert script["resume_exact"] is True and len(script["losses"]) == 3
    assert script["export_dtypes"] == ["F32"] and script["train_state_dtypes"] == ["torch.float32"]
    fsdp = found["fsdp"]["figures"]
    assert fsdp["backend"] == "gloo" and fsdp["world_size"] == 1
    assert all(fsdp[k] is True for k in ("load_equal_from_pretrained", "grads_finite",
                                         "weights_equal_after_load", "adam_equal_after_load"))
    gaps = found["logprob"]["figures"]
    assert set(gaps) == {f"{model}/{path}" for model in ("toy", "random_tiny")
                         for path in ("fp32_masters_autocast", "frozen_bf16")}
    assert all(0 < g["mean_abs_dlogp"] < 0.1 for g in gaps.values())  # bf16 rounding, not zero
    one_gpu = found["1.7b"]["figures"]
    # tiny Qwen3: 2 layers x 2 KV heads x 16 dims x (keys + values) x 4 bytes (fp32 on CPU)
    assert one_gpu["kv_bytes_per_position"] == 2 * 2 * 16 * 2 * 4
    assert one_gpu["kv_key_dtypes"] == one_gpu["kv_value_dtypes"] == ["torch.float32"]
    assert one_gpu["mfu_6NT"] is None and one_gpu["peak_allocated_gib"] is None  # CUDA only
    assert found["8b-score"]["figures"]["finite"] is True
    assert set(found["8b-slice"]["figures"]) >= {"layers_2", "layers_4", "fwd_bwd_seconds_extrapolated"}
    table = result.stdout.split("check           status")[1]
    assert all(f"\n{name:<15} " in table for name in gpu_smoke.CHECKS)


def test_a_check_past_its_time_is_killed_and_the_rest_still_run(tmp_path):
    out = tmp_path / "smoke.jsonl"
    out.write_text('{"check": "earlier run"}\n')  # appended to, never overwritten
    logs = tmp_path / "smoke.log"
    result = run_script([*SMOKE, "--out", str(out), "--only", "logprob,env", "--timeout", "logprob=1",
                         "--logs", str(logs)], timeout=120, check=False)
    assert result.returncode == 1
    found = records(out)
    assert list(found) == ["earlier run", "logprob", "env"]
    assert found["logprob"]["status"] == "timeout" and found["logprob"]["reason"] == "killed after 1 s"
    assert found["env"]["status"] == "pass"
    text = logs.read_text()
    assert text.startswith("===== logprob (timeout)\n") and "\n===== env (pass)\n" in text


def test_unknown_check_is_one_line():
    result = run_script([*SMOKE, "--out", "/dev/null", "--only", "env,gpu"], check=False, timeout=60)
    assert result.returncode == 2
    assert result.stdout.strip() == ("error: --only gpu: unknown check; choose from "
                                     + ",".join(gpu_smoke.CHECKS))
