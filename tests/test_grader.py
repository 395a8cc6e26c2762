"""Grading: math-verify through a bounded worker; answers from the last \\boxed{}."""

import subprocess
import sys
import time

import pytest

import common


@pytest.fixture(scope="module")
def grader():
    g = common.Grader(timeout=10.0)
    yield g
    g.close()


def test_boxed_extraction():
    assert common.extract_boxed_answer("so \\boxed{3} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert common.extract_boxed_answer("\\boxed{a{b}c} trailing") == "a{b}c"
    assert common.extract_boxed_answer("<think>\\boxed{1}</think> no box after thinking") is None
    assert common.extract_boxed_answer("unclosed \\boxed{12") is None
    assert common.extract_boxed_answer("nothing here") is None
    text = "x \\boxed{7} y \\boxed {\\boxed{8}} z \\boxed{9"
    start, end = common.answer_span(text)
    assert text[start:end] == "\\boxed {\\boxed{8}}" and common.extract_boxed_answer(text) == "8"


@pytest.mark.parametrize("response,gold", [
    ("The answer is \\boxed{73}.", "73"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac12"),
    ("\\boxed{1+x^2}", "x^2+1"),
    ("first \\boxed{4} then corrected \\boxed{5}", "5"),
    ("\\boxed{\\boxed{9}}", "9"),
])
def test_equivalent_forms_are_correct(grader, response, gold):
    rewards, counts = grader.grade([response], [gold])
    assert rewards == [1.0] and counts == {"no_answer": 0, "timeout": 0}


def test_wrong_and_missing_answers(grader):
    rewards, counts = grader.grade(
        ["\\boxed{74}", "The answer is 73.", "\\boxed{5} then \\boxed{4}", "", "\\boxed{}"], ["73", "73", "5", "1", "1"])
    assert rewards == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert counts["no_answer"] == 2  # no \boxed{} at all (reward 0, counted)


def test_math_verify_own_time_limit_counts_as_a_timeout():
    """A huge tower of powers burns CPU: the worker stops it at its own CPU limit (1 s here, well
    inside the wall-clock backstop), the answer counts as a timeout, and the worker lives on."""
    grader = common.Grader(timeout=1.0)
    assert grader.grade(["\\boxed{1}"], ["1"])[0] == [1.0]  # start the worker outside the timed part
    worker, started = grader._worker, time.time()
    rewards, counts = grader.grade(["\\boxed{9^{9^{9^{9}}}}"], ["\\boxed{10^{10^{10^{10}}}}"])
    assert rewards == [0.0] and counts == {"no_answer": 0, "timeout": 1}
    assert time.time() - started < 4.0  # 1 CPU second, not the 5 s backstop
    assert grader._worker is worker and worker.is_alive()  # the backstop did not kill it
    assert grader.grade(["\\boxed{2}", "\\boxed{3}"], ["2", "4"]) == ([1.0, 0.0], {"no_answer": 0, "timeout": 0})
    grader.close()


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_grader_timeout_must_be_positive(timeout):
    with pytest.raises(common.UserError, match="must be > 0"):
        common.Grader(timeout)


def test_known_false_negative_inexact_scientific_notation(grader):
    """Documented in the README: math-verify (and so TRL's accuracy reward) compares 5.1*10^2 as the
    float 509.99999999999994, not 510. If this starts passing as correct, update the README."""
    rewards, _ = grader.grade(["\\boxed{5.1\\times 10^{2}}", "\\boxed{510}"], ["510", "510"])
    assert rewards == [0.0, 1.0]


def test_identical_answers_are_graded_once(grader, monkeypatch):
    asked = []
    verdict = grader._verdict
    monkeypatch.setattr(grader, "_verdict", lambda pair: asked.append(pair) or verdict(pair))
    responses = ["\\boxed{2}", "x \\boxed{3}", "none", "\\boxed{2}"] * 25
    rewards, counts = grader.grade(responses, ["2"] * 100)
    assert rewards == [1.0, 0.0, 0.0, 1.0] * 25 and counts == {"no_answer": 25, "timeout": 0}
    assert len(asked) == 2  # two distinct (gold, answer) pairs


def _worker_that_hangs(connection, parent_end, cpu_seconds):
    """A stand-in worker: equal strings are correct; an answer containing "hang" never comes back
    (like math-verify stuck in C code, where its own CPU limit cannot fire)."""
    parent_end.close()
    connection.send("ready")
    while True:
        gold, pred = connection.recv()
        if "hang" in pred:
            time.sleep(3600)
        connection.send(gold == pred)


def test_hung_answer_in_a_batch_costs_only_itself(monkeypatch):
    """The worker hangs on the second answer: it is killed at the wall-clock backstop, that answer
    is a timeout, and the answers after it are graded by a fresh worker."""
    monkeypatch.setattr(common, "_grader_worker", _worker_that_hangs)
    grader = common.Grader(timeout=0.2)
    assert grader.grade(["\\boxed{1}"], ["1"])[0] == [1.0]
    first, started = grader._worker, time.time()
    rewards, counts = grader.grade(["\\boxed{2}", "\\boxed{hang}", "\\boxed{3}", "\\boxed{5}"],
                                   ["2", "hang", "4", "5"])
    assert rewards == [1.0, 0.0, 0.0, 1.0] and counts == {"no_answer": 0, "timeout": 1}
    assert 1.0 <= time.time() - started < 3.0  # 5 x 0.2 s
    assert not first.is_alive() and grader._worker is not first
    grader.close()


def test_missing_math_verify_is_a_one_line_error_at_start_up(monkeypatch):
    """Without math-verify every answer used to score 0 silently (the worker's stderr went
    nowhere)."""
    real = common.importlib.util.find_spec
    monkeypatch.setattr(common.importlib.util, "find_spec",
                        lambda name, *args: None if name == "math_verify" else real(name, *args))
    expected = r"^the grader needs math-verify, which is not installed: pip install math-verify$"
    with pytest.raises(common.UserError, match=expected):
        common.Grader()


def test_a_worker_that_cannot_import_math_verify_is_an_error_not_zeros(tmp_path, monkeypatch):
    """A broken install (here a planted math_verify module that raises on import) fails the first
    grade with the worker's import error, instead of rewards of 0."""
    (tmp_path / "math_verify.py").write_text("raise ImportError('planted: broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the forked worker imports from here
    monkeypatch.delitem(sys.modules, "math_verify", raising=False)
    grader = common.Grader(timeout=5.0)
    expected = (r"^the grader's math-verify worker did not start \(ImportError: planted: broken "
                r"install\); check that `python[\d.]* -c 'import math_verify'` works")
    with pytest.raises(common.UserError, match=expected):
        grader.grade(["\\boxed{2}"], ["2"])
    assert grader._worker is None  # killed, nothing left running


def test_the_bound_is_cpu_time_so_a_loaded_machine_grades_right():
    """Known-correct answers on a deliberately loaded machine: busy processes on every core and the
    worker paused for 2 s (a machine so busy it got no CPU) while it grades; 3 s of wall clock
    pass, far over a 0.5 s bound, yet only its CPU time counts."""
    import os
    import signal
    import threading

    grader = common.Grader(timeout=0.5)
    assert grader.wall_timeout == 2.5
    grader.wall_timeout = 30.0  # this test's pause must not reach the wall-clock backstop
    assert grader.grade(["\\boxed{1}"], ["1"])[0] == [1.0]  # the worker is up (sympy imported)
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"  # stops by itself
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2 * os.cpu_count())]
    worker = grader._worker
    pid = worker.pid
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(2.0, os.kill, (pid, signal.SIGCONT)).start()
    try:
        started = time.time()
        rewards, counts = grader.grade(["\\boxed{{{{613}}}}", "so \\boxed{(x+8)^2}"],
                                       ["613", "x^2+16x+64"])
        elapsed = time.time() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        for process in busy:
            process.kill()
            process.wait()
    assert rewards == [1.0, 1.0] and counts == {"no_answer": 0, "timeout": 0}
    assert elapsed > 2.0  # the wall clock ran well past the bound
    assert grader._worker is worker and worker.is_alive()  # not killed either
    grader.close()


def test_wall_clock_backstop_kills_a_worker_that_never_answers():
    """A worker that neither answers nor burns CPU (stopped here) is killed at the backstop, the
    answer counted as a timeout, and the next batch gets a fresh worker."""
    import os
    import signal

    grader = common.Grader(timeout=0.2)
    assert grader.grade(["\\boxed{1}"], ["1"])[0] == [1.0]
    worker = grader._worker
    os.kill(worker.pid, signal.SIGSTOP)
    started = time.time()
    assert grader.grade(["\\boxed{2}"], ["2"]) == ([0.0], {"no_answer": 0, "timeout": 1})
    assert 1.0 <= time.time() - started < 3.0  # 5 x 0.2 s
    assert not worker.is_alive() and grader._worker is None
    assert grader.grade(["\\boxed{2}"], ["2"]) == ([1.0], {"no_answer": 0, "timeout": 0})
    grader.close()
