"""TRACE (trace.py): segments and their tokens (toy and a trained BPE tokenizer), the coverage cap, the
schedule, the bounded FKL/RKL against a naive full-vocabulary computation, the annotators (oracle,
random, the self annotator's parser, the api annotator against a local HTTP server), routing in the
training loop, no teacher after kl_end, end-to-end toy runs (also under torchrun), and the name it
shares with the standard library's `trace` module."""

import json
import math
import random
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import common
import trace
from common import UserError, parse_toy_steps
from conftest import ROOT, run_script, torchrun

FAST = ["--num_problems", "4", "--num_generations", "4", "--eval_dataset", "", "--max_new_tokens", "40"]
PROBLEM = "Start at 7, apply +3 *2 -4."  # answer 16


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_this_trace_is_the_projects():
    assert trace.__file__ == str(ROOT / "trace.py")


# ---- segments ------------------------------------------------------------------------------------


def test_split_segments_lines_blanks_and_long_lines():
    assert trace.split_segments("  a \n\n b") == [(2, 3), (7, 8)]
    text = "aaaa bbbb cccc dddd"
    assert trace.split_segments(text, 10) == [(0, 9), (10, 19)]  # cut after the last space of a piece
    assert trace.split_segments("x" * 25, 10) == [(0, 10), (10, 20), (20, 25)]  # no space: hard cut
    assert trace.split_segments("ab\n" + "x" * 12 + "\ncd", 10) == [(0, 2), (3, 13), (13, 15), (16, 18)]
    assert trace.split_segments("") == [] and trace.split_segments("\n \n") == []


def test_segments_to_tokens_on_the_toy_tokenizer(toy_tokenizer):
    tok = toy_tokenizer
    ids = tok("<think>\n7+3=10\n10*2=20\n</think>\n\\boxed{20}", add_special_tokens=False).input_ids
    ids.append(tok.eos_token_id)
    text, spans = trace.response_text(tok, ids)
    assert text == "<think>\n7+3=10\n10*2=20\n</think>\n\\boxed{20}" + " " * len("<|im_end|>")  # eos blanked
    segments = trace.split_segments(text)
    assert [text[a:b] for a, b in segments] == ["<think>", "7+3=10", "10*2=20", "</think>", "\\boxed{20}"]
    assert trace.segment_tokens(spans, segments) == [[0], [2, 3, 4, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [17],
                                                     [19, 20, 21, 22]]  # newlines (1, 8, 16, 18), eos (23): none


def bpe_tokenizer():
    """A byte-pair tokenizer trained here on toy lines: its tokens join characters across line ends."""
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(vocab_size=32, special_tokens=["[UNK]", "<eos>"], show_progress=False)
    backend.train_from_iterator(["7+3=10\n10*2=20\n20-4=16\n"] * 50 + ["check 20/2=10 ok\n"] * 20, trainer)
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="[UNK]")


def test_segments_to_tokens_on_a_trained_bpe_tokenizer():
    tok = bpe_tokenizer()
    ids = tok("7+3=10\n10*2=20\n20-4=16\n", add_special_tokens=False).input_ids + [tok.eos_token_id]
    text, spans = trace.response_text(tok, ids)
    assert [text[a:b] for a, b in spans] == ["7+3", "=10", "\n10", "*2=", "20", "\n20", "-4", "=", "16", "\n",
                                             " " * 5]
    segments = trace.split_segments(text)
    assert [text[a:b] for a, b in segments] == ["7+3=10", "10*2=20", "20-4=16"]
    # "10*2=20" starts inside the token "\n10" and "20-4=16" inside "\n20": those tokens belong to them
    assert trace.segment_tokens(spans, segments) == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    # a span that starts and ends mid-token takes every token it touches
    assert trace.segment_tokens(spans, [(1, 4), (5, 8)]) == [[0, 1], [1, 2]]


def test_coverage_cap_keeps_annotator_order_and_truncates_the_last_span():
    seg_tokens = [[0, 1, 2], [3, 4], [10, 11, 12, 13]]
    mask = trace.capped_mask([2, 0, 1], seg_tokens, 20, alpha=0.25)  # budget floor(5) tokens
    assert mask.nonzero().flatten().tolist() == [0, 10, 11, 12, 13]  # seg 2 whole, seg 0 cut to 1, seg 1 dropped
    assert trace.capped_mask([0, 1], seg_tokens, 20, 0.25).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert trace.capped_mask([0, 0, 1], seg_tokens, 8, 0.5).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert not trace.capped_mask([0], seg_tokens, 3, 0.25).any()  # floor(0.75) = 0 tokens
    assert trace.capped_mask([], seg_tokens, 20).sum() == 0
    assert trace.capped_mask([1], seg_tokens, 20, 1.0).nonzero().flatten().tolist() == [3, 4]


# ---- schedule, loss pieces ----------------------------------------------------------------------------


def test_lambda_schedule():
    values = [trace.kl_weight(k, 0.5, 10, 40) for k in (0, 9, 10, 25, 40, 41)]
    assert values == [0.5, 0.5, 0.5, 0.25, 0.0, 0.0]
    assert trace.kl_weight(39, 0.5, 10, 40) == pytest.approx(0.5 / 30)
    assert [trace.kl_weight(k, 0.5, 5, 5) for k in (4, 5)] == [0.5, 0.0]  # no ramp


def test_policy_loss_fades_routed_tokens():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]], requires_grad=True)
    advantages = torch.tensor([[1.0] * 3, [-2.0] * 3])
    weights = torch.tensor([[1.0, 0.25, 1.0], [1.0, 1.0, 0.0]])  # 0.25 = 1 - lambda/lambda_0 on S; 0 = padding
    loss = trace.policy_loss(logp, logp.detach(), advantages, weights, num_tokens=5)
    loss.backward()
    assert loss.item() == pytest.approx(-(1 + 0.25 + 1 - 2 - 2) / 5)
    assert torch.allclose(logp.grad, -weights * advantages / 5)


def test_kl_bound_modes_values_and_gradients():
    for mode, value, grad in [("rescale", [0.01, 0.05, 0.05], [1.0, 1.0, 0.25]),
                              ("clamp", [0.01, 0.05, 0.05], [1.0, 1.0, 0.0])]:
        d = torch.tensor([0.01, 0.05, 0.2], requires_grad=True)
        out = trace.bound_kl(d, 0.05, mode)
        out.sum().backward()
        assert torch.allclose(out, torch.tensor(value)) and torch.allclose(d.grad, torch.tensor(grad)), mode
    d = torch.tensor([0.01, 0.2], requires_grad=True)
    out = trace.bound_kl(d, 0.0)
    out.sum().backward()
    assert torch.equal(out, d.detach()) and torch.equal(d.grad, torch.ones(2))


def naive_kl(h_s, w_s, h_t, w_t, mask, direction):
    log_s = torch.log_softmax(h_s @ w_s.T, -1)
    log_t = torch.log_softmax((h_t @ w_t.T).detach(), -1)
    d = (log_t.exp() * (log_t - log_s)).sum(-1) if direction == "forward" else (log_s.exp() * (log_s - log_t)).sum(-1)
    return torch.where(mask, d, 0.0)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("clip, mode", [(0.0, "rescale"), (0.05, "rescale"), (0.05, "clamp")])
@pytest.mark.parametrize("live_teacher", [False, True])
def test_span_kl_chunked_equals_naive_with_gradients(direction, clip, mode, live_teacher):
    """span_kl's term (weight 1, over 1 token) is sum_S D'_t: the route's sign picks the direction,
    the teacher's logits carry no gradient even when its head is the live policy's."""
    torch.manual_seed(0)
    batch, length, hidden, vocab = 3, 7, 8, 50
    h_s = torch.randn(batch, length, hidden, dtype=torch.float64)
    scale = torch.tensor([0.02, 0.3, 3.0], dtype=torch.float64)[:, None, None]  # KLs below and above the clip
    h_t = h_s + scale * torch.randn(batch, length, hidden, dtype=torch.float64)
    w_s = torch.randn(vocab, hidden, dtype=torch.float64)
    w_t = w_s if live_teacher else w_s + 0.05 * torch.randn(vocab, hidden, dtype=torch.float64)
    mask = torch.rand(batch, length) < 0.5
    grads, values = [], []
    for chunked in (True, False):
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        wt = ws if live_teacher else w_t  # the live policy's head also scores the teacher
        if chunked:
            args = trace.Args(kl_clip=clip, kl_clip_mode=mode, logprob_chunk_size=2)
            span = torch.where(mask, 1.0 if direction == "forward" else -1.0, 0.0)
            student = (lambda h: h @ ws.T, hs, torch.zeros(batch, length, dtype=torch.float64))
            loss, _, bounded, _ = trace.span_kl(args, 1.0, student, (lambda h: h @ wt.T, h_t),
                                                torch.zeros(batch, length, dtype=torch.long), span,
                                                [length] * batch, 1, batch)
        else:
            d = naive_kl(hs, ws, h_t, wt, mask, direction)
            loss, bounded = trace.bound_kl(d, clip, mode)[mask].sum(), trace.bound_kl(d, clip, mode).detach()
        loss.backward()
        values.append(bounded)
        grads.append((hs.grad, ws.grad))
    raw = naive_kl(h_s, w_s, h_t, w_t, mask, direction)[mask]
    assert (raw < 0.05).any() and (raw > 0.05).any() and (values[0] != 0).sum() == mask.sum()
    assert torch.allclose(values[0], values[1], atol=1e-5)
    for chunked_grad, naive_grad in zip(*grads):
        assert torch.allclose(chunked_grad, naive_grad, atol=1e-5)


# ---- annotators ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer, expected", [
    ('{"spans": [1, 3], "label": "arithmetic"}', ([0, 2], "arithmetic")),
    ('Sure! {"spans": [2], "label": "Logic"} then {"spans": [1]}', ([1], "logic")),
    ('{"spans": [1, 1, 2], "label": "  a   very long free-text label that goes on beyond forty chars"}',
     ([0, 1], "a very long free-text label that goes on")),
    ('{"spans": []}', ([], "other")),
    ('{broken {"spans": [3], "label": 5}', ([2], "other")),
    ('{"spans": [4]}', None), ('{"spans": [0]}', None), ('{"spans": "2"}', None), ('{"spans": [true]}', None),
    ('{"spans": [1.0]}', None), ('{"label": "logic"}', None), ('{"spans": [1]', None), ("[1, 2]", None),
    ('{"a": {"spans": [1]}}', None), ("<think>\n7+3=10\n</think>", None), ("", None),
])
def test_self_annotator_parser(answer, expected):
    assert trace.parse_annotation(answer, 3) == expected


def oracle(response, correct):
    request = trace.Request(PROBLEM, response, trace.split_segments(response), correct)
    return trace.oracle_annotation(request)


def test_oracle_spans_and_labels():
    careful = "<think>\n7+3=10\n10*2=20\n20-4=16\n</think>\n\\boxed{16}"
    assert oracle(careful, True) == ([3], "key step")  # the last step line
    assert oracle("<think>\n</think>\n\\boxed{16}", True) == ([2], "answer")  # a shortcut: its answer line
    assert oracle("<think>\n7+3=10\n10*2=21\n21-4=17\n</think>\n\\boxed{17}", False) == ([2], "arithmetic")
    assert oracle("<think>\n7+3=10\n10+2=12\n</think>\n\\boxed{12}", False) == ([2], "logic")  # wrong operation
    assert oracle("<think>\n</think>\n\\boxed{15}", False) == ([2], "answer")
    assert oracle("<think>\n7+3=10\ncheck 10-3=7 no\n</think>", False) == ([2], "check")


def test_random_spans_are_contiguous_length_matched_and_seeded():
    valid = list(range(9))
    for seed in range(20):
        mask = trace.random_mask(10, 3, random.Random(seed), valid)
        where = mask.nonzero().flatten().tolist()
        assert len(where) == 3 and where == list(range(where[0], where[0] + 3)) and where[-1] <= 8
    assert torch.equal(trace.random_mask(10, 3, random.Random(5)), trace.random_mask(10, 3, random.Random(5)))
    assert trace.random_mask(4, 9, random.Random(0)).all() and not trace.random_mask(4, 0, random.Random(0)).any()


class OpenAIServer:
    """A small OpenAI-format /v1/chat/completions on 127.0.0.1; the first path part picks a behaviour."""

    def __init__(self):
        self.seen = []
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = self.path.split("/")[1]
                server_self.seen.append((mode, self.headers.get("Authorization"), body))
                tries = sum(1 for m, _, _ in server_self.seen if m == mode)
                if mode in ("error500", "unauthorized") or (mode == "flaky" and tries == 1):
                    self.send_response(500 if mode != "unauthorized" else 401)
                    self.end_headers()
                    return
                if mode in ("slow", "hang"):
                    time.sleep(1.5 if mode == "slow" else 3.0)  # "hang": far past the timeout
                content = {"badanswer": "segment 2 is wrong"}.get(mode, '{"spans": [2], "label": "Arithmetic"}')
                answer = {"choices": [{"message": {"role": "assistant", "content": content}}]}
                reply = {"malformed": b"{not json", "shape": b'{"data": [1, 2]}'}.get(
                    mode, json.dumps(answer).encode())
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    server = OpenAIServer()
    yield server
    server.close()


def requests(n=2):
    text = "<think>\n7+3=10\n10*2=21\n</think>\n\\boxed{17}"
    return [trace.Request(PROBLEM, text, trace.split_segments(text), False) for _ in range(n)]


def test_api_annotator_valid_malformed_errors_and_timeouts(server, monkeypatch):
    """One POST per request, in turn; any failure (HTTP status, not a chat completion) is retried
    --annotator_retries times at once (no backoff) and named by its exception; once a request timed
    out on every attempt the step sends no more."""
    monkeypatch.setenv("TRACE_TEST_KEY", "sk-secret-123")

    def ask(mode, n=2, **options):
        args = trace.Args(annotator="api", annotator_url=f"{server.url}/{mode}/v1",
                          annotator_model="judge", annotator_key_env="TRACE_TEST_KEY", **options)
        return trace.ask_api(args, requests(n))

    def sent(mode):
        return sum(1 for m, _, _ in server.seen if m == mode)

    valid = '{"spans": [2], "label": "Arithmetic"}'
    assert ask("valid", 3) == ([valid] * 3, "")
    mode, auth, body = server.seen[0]
    assert auth == "Bearer sk-secret-123" and body["model"] == "judge" and body["temperature"] == 0.0
    assert "[2] 7+3=10" in body["messages"][0]["content"] and "incorrect" in body["messages"][0]["content"]
    assert ask("badanswer") == (["segment 2 is wrong"] * 2, "")  # the caller's parser refuses it
    answers, error = ask("malformed", 1, annotator_retries=2)
    assert answers == [None] and error.startswith("JSONDecodeError: ") and sent("malformed") == 3
    assert ask("shape", 1, annotator_retries=0) == ([None], "KeyError: 'choices'") and sent("shape") == 1
    started = time.time()
    http_500 = "HTTPError: HTTP Error 500: Internal Server Error"
    assert ask("error500", 1, annotator_retries=3) == ([None], http_500)
    assert sent("error500") == 4 and time.time() - started < 3  # 1 + 3 retries, no 1+2+4 s backoff
    assert ask("unauthorized", 2, annotator_retries=1) == ([None] * 2, "HTTPError: HTTP Error 401: Unauthorized")
    assert sent("unauthorized") == 4  # a 4xx is retried too, and a failed request ends no step
    assert ask("flaky", 1, annotator_retries=1) == ([valid], http_500) and sent("flaky") == 2
    started = time.time()
    answers, error = ask("slow", 4, annotator_timeout=0.3, annotator_retries=1)
    assert answers == [None] * 4 and error == "TimeoutError: timed out"
    assert time.time() - started < 1.5  # the first request's 2 attempts, then none sent: no stall
    assert sent("slow") == 2
    for url in (server.url + "/v1", server.url + "/v1/", server.url + "/v1/chat/completions"):
        assert trace.api_url(trace.Args(annotator_url=url)) == server.url + "/v1/chat/completions"


def test_api_annotator_stops_only_when_every_attempt_timed_out(monkeypatch):
    """A connect timeout (urllib wraps it in URLError) counts as a timeout; a request whose retry
    fails otherwise does not stop the step's asking."""
    calls, failures = [], []

    def urlopen(post, timeout):
        calls.append(timeout)
        raise failures.pop(0) if failures else urllib.error.URLError(TimeoutError("timed out"))

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    args = trace.Args(annotator="api", annotator_url="http://judge/v1", annotator_model="m",
                      annotator_timeout=0.5)
    assert trace.ask_api(args, requests(3)) == ([None] * 3, "URLError: <urlopen error timed out>")
    assert calls == [0.5, 0.5]  # the first request's 2 attempts timed out: the others not sent
    calls.clear()
    failures.extend([urllib.error.URLError(TimeoutError("timed out")), ConnectionResetError("reset")] * 3)
    answers, error = trace.ask_api(args, requests(3))
    assert answers == [None] * 3 and error == "ConnectionResetError: reset" and len(calls) == 6


def test_api_annotator_in_training_never_logs_the_key(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACE_TEST_KEY", "sk-secret-123")
    trace.main([*FAST, "--num_steps", "1", "--route", "both", "--annotator", "api", "--annotator_url",
                f"{server.url}/valid/v1", "--annotator_model", "judge", "--annotator_key_env", "TRACE_TEST_KEY",
                "--output_dir", str(tmp_path)])
    run_dir = next(tmp_path.iterdir())
    (record,) = records(run_dir)
    assert record["annotation_success"] == 1 and record["annotated"] == 16
    assert all(auth == "Bearer sk-secret-123" for _, auth, _ in server.seen) and len(server.seen) == 16
    written = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file())
    assert "sk-secret" not in written + capsys.readouterr().out
    with pytest.raises(UserError, match="TRACE_MISSING_KEY"):
        trace.main([*FAST, "--annotator", "api", "--annotator_url", server.url, "--annotator_model", "m",
                    "--annotator_key_env", "TRACE_MISSING_KEY", "--output_dir", str(tmp_path)])


def closed_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the probe is closed


# every annotation fails this way: (server mode, the last error the run names)
FAILURES = [
    ("refused", "URLError: <urlopen error [Errno 111] Connection refused>"),
    ("hang", "TimeoutError: timed out"),
    ("unauthorized", "HTTPError: HTTP Error 401: Unauthorized"),
    ("malformed", "JSONDecodeError: "),
    ("shape", "KeyError: 'choices'"),
    ("badanswer", "an answer is not the JSON object asked for: 'segment 2 is wrong'"),
]
TINY_API = [*FAST, "--num_problems", "2", "--num_generations", "2", "--max_new_tokens", "16",
            "--route", "both", "--annotate", "all", "--annotator_model", "judge"]


@pytest.mark.parametrize("mode, error", FAILURES)
def test_failing_annotator_stops_the_run(mode, error, server, tmp_path, capsys):
    """Every annotation fails: each step says so on stdout and logs annotation_failed; the third
    such step stops the run before its update, naming the annotator, the endpoint and the last
    error. A hanging endpoint costs one request's two attempts per step (--annotator_concurrency
    is accepted and ignored: requests go one at a time)."""
    url = f"http://127.0.0.1:{closed_port()}/v1" if mode == "refused" else f"{server.url}/{mode}/v1"
    with pytest.raises(UserError) as stopped:
        trace.main([*TINY_API, "--annotator", "api", "--annotator_url", url, "--annotator_timeout",
                    "0.5", "--annotator_concurrency", "1", "--num_steps", "5",
                    "--output_dir", str(tmp_path)])
    said = f"--annotator api at {url}/chat/completions, model judge; last error: {error}"
    message = str(stopped.value)
    assert message.startswith(f"no annotation succeeded in 3 consecutive steps ({said}"), message
    assert message.endswith("stopped before the update of step 3, as TRACE would train plain GRPO. "
                            "Fix the annotator (then --resume from the last checkpoint), or pass "
                            "--annotator_patience 0 to train on regardless.")
    out = capsys.readouterr().out
    for step in (1, 2, 3):
        assert f"[trace] step {step}: 4 of 4 annotations failed ({said}" in out
    logged = [(r["step"], r["annotated"], r["annotation_failed"], r["annotation_success"])
              for r in records(next(tmp_path.iterdir()))]
    assert logged == [(1, 4, 4, 0), (2, 4, 4, 0)]
    if mode == "hang":  # per step: 1 request x 2 attempts
        assert sum(1 for m, _, _ in server.seen if m == "hang") == 3 * 2


def test_annotator_patience_zero_trains_on_and_counts(server, tmp_path, capsys):
    trace.main([*TINY_API, "--annotator", "api", "--annotator_url", f"{server.url}/unauthorized/v1",
                "--annotator_patience", "0", "--num_steps", "4", "--output_dir", str(tmp_path)])
    logged = records(next(tmp_path.iterdir()))
    assert [r["annotation_failed"] for r in logged] == [4, 4, 4, 4]
    assert all(r["share_grpo"] == 1 for r in logged)
    assert capsys.readouterr().out.count("annotations failed (--annotator api at ") == 4


def test_self_annotator_that_never_parses_stops_the_run(tmp_path):
    """The toy model cannot write the JSON answer: --annotator_patience 1 stops the first step."""
    with pytest.raises(UserError, match=r"^no annotation succeeded in 1 consecutive steps "
                                        r"\(--annotator self; last error: an answer is not "
                                        r"the JSON object asked for: '"):
        trace.main([*TINY_API, "--annotator", "self", "--annotator_max_tokens", "8",
                    "--annotator_patience", "1", "--output_dir", str(tmp_path)])


# ---- the training loop ----------------------------------------------------------------------------------


class Recorder:
    """Records, per logged step, the teacher's forwards (`common.response_hidden` without gradient:
    in these runs, --num_minibatches 1, only the teacher runs so), the routed KL calls
    (`common.token_kl`), the oracle's
    annotations, and whether the frozen teacher copy (`common.load_model` with trainable=False) is
    alive."""

    def __init__(self, monkeypatch):
        self.step, self.teacher, self.kl, self.annotations, self.teacher_alive = 0, [], [], [], {}
        hidden, kl, annotate = common.response_hidden, common.token_kl, trace.oracle_annotation
        log, load = common.RunLogger.log, common.load_model
        self.frozen = None

        def recording_hidden(model, prompts, responses, pad_id):
            if not torch.is_grad_enabled():
                self.teacher.append((self.step, prompts, responses))
            return hidden(model, prompts, responses, pad_id)

        def recording_kl(student_head, student_hidden, teacher_head, teacher_hidden, mask,
                         direction, chunk_size=512):
            self.kl.append((self.step, mask.cpu().clone(), direction))
            return kl(student_head, student_hidden, teacher_head, teacher_hidden, mask, direction,
                      chunk_size)

        def recording_annotation(request):
            self.annotations.append(self.step)
            return annotate(request)

        def recording_load(name, dist_info, **kwargs):
            model = load(name, dist_info, **kwargs)
            if not kwargs.get("trainable", True):
                self.frozen = weakref.ref(model)
            return model

        def counting_log(logger, step, metrics, prefix="step"):
            log(logger, step, metrics, prefix)
            if prefix == "step":
                import gc
                gc.collect()
                self.teacher_alive[self.step] = self.frozen is not None and self.frozen() is not None
                self.step += 1

        monkeypatch.setattr(common, "response_hidden", recording_hidden)
        monkeypatch.setattr(common, "token_kl", recording_kl)
        monkeypatch.setattr(trace, "oracle_annotation", recording_annotation)
        monkeypatch.setattr(common, "load_model", recording_load)
        monkeypatch.setattr(common.RunLogger, "log", counting_log)


@pytest.mark.parametrize("route,annotate", [("fkl_key", "routed"), ("rkl_error", "routed"), ("fkl_key", "all")])
def test_routing_only_on_the_routes_spans(route, annotate, tmp_path, monkeypatch, toy_tokenizer):
    seen = Recorder(monkeypatch)
    trace.main([*FAST, "--num_problems", "8", "--num_steps", "2", "--route", route, "--annotator", "oracle",
                "--teacher_context", "label+solution", "--annotate", annotate, "--output_dir", str(tmp_path)])
    feedback = trace.FEEDBACK[route == "fkl_key"]
    other = trace.FEEDBACK[route != "fkl_key"]
    direction = "forward" if route == "fkl_key" else "reverse"
    routed = 0
    assert seen.kl and {d for _, _, d in seen.kl} == {direction}  # one direction: the route's
    for (step, prompts, responses), (kl_step, mask, _) in zip(seen.teacher, seen.kl):
        assert step == kl_step and mask.shape[0] == len(responses)
        for prompt, response, row in zip(prompts, responses, mask):
            prompt_text = toy_tokenizer.decode(prompt)
            assert feedback in prompt_text and other not in prompt_text  # only rollouts of the route's class
            # the routed tokens lie in the oracle's line (independently: parse_toy_steps' character spans)
            text, spans = trace.response_text(toy_tokenizer, response)
            lines = parse_toy_steps(prompt_text.split("\n")[1], text)  # the user message's first line
            wanted = ([line for line in lines if line["kind"] == "step"] or
                      [line for line in lines if line["kind"] == "answer"])[-1:] if route == "fkl_key" else \
                [line for line in lines if not line["correct"]][:1]
            inside = {t for t, (a, b) in enumerate(spans) for line in wanted
                      if max(a, line["start"]) < min(b, line["end"])}
            where = set(row[:len(response)].nonzero().flatten().tolist())
            assert where and where <= inside and len(where) <= math.floor(0.25 * len(response))
            assert where == set(sorted(inside)[:len(where)])  # the line's first tokens (the cap truncates)
            assert not row[len(response):].any()
            routed += len(where)
    totals = records(next(tmp_path.iterdir()))
    share = "share_fkl" if route == "fkl_key" else "share_rkl"
    assert sum(r[share] * r["response_len"] * 32 for r in totals) == pytest.approx(routed)
    if annotate == "all":  # every rollout annotated, yet KL only on the route's class (checked above)
        assert len(seen.annotations) == 64 and all(r["annotated"] == 32 for r in totals)
    else:  # only the route's class
        assert all(r["annotated"] == round(r["reward"] * 32 if route == "fkl_key" else 32 - r["reward"] * 32)
                   for r in totals)


def test_no_annotation_no_teacher_after_kl_end_and_copy_freed(tmp_path, monkeypatch):
    seen = Recorder(monkeypatch)
    trace.main([*FAST, "--num_steps", "4", "--route", "both", "--annotator", "oracle", "--kl_hold", "1",
                "--kl_end", "2", "--teacher_sync_every", "2", "--output_dir", str(tmp_path)])
    assert {step for step, _, _ in seen.teacher} == {0, 1} and set(seen.annotations) == {0, 1}
    assert seen.teacher_alive == {0: True, 1: True, 2: False, 3: False}
    lams = [r["lambda_k"] for r in records(next(tmp_path.iterdir()))]
    assert lams == [0.5, 0.5, 0.0, 0.0]
    assert [r["teacher_refreshes"] for r in records(next(tmp_path.iterdir()))] == [1, 1, 1, 1]
    page = (next(tmp_path.iterdir()) / "tokens.html").read_text()  # the last step with routing, not a GRPO one
    assert "step 2 | reward" in page and "step 4 | reward" not in page
    assert "route=fkl: forward KL (key span of a correct rollout)  D=" in page or \
        "route=rkl: reverse KL (error span of an incorrect rollout)  D=" in page
    assert page.count('class="swatch"') == 3 and "linear-gradient" not in page  # categories


def test_grpo_and_live_teacher_load_no_copy(tmp_path, monkeypatch):
    seen = Recorder(monkeypatch)
    trace.main([*FAST, "--num_steps", "1", "--lambda_0", "0", "--annotator", "oracle", "--output_dir",
                str(tmp_path / "grpo")])
    assert seen.teacher == [] and seen.annotations == [] and seen.frozen is None
    trace.main([*FAST, "--num_steps", "1", "--route", "both", "--annotator", "oracle", "--teacher_sync_every", "1",
                "--output_dir", str(tmp_path / "live")])
    assert seen.teacher and seen.frozen is None


def test_grpo_term_on_routed_tokens_fades_with_lambda(tmp_path, monkeypatch):
    """L = sum_N l_t + (1 - lambda_k/lambda_0) sum_S l_t + ...: with kl_hold 0 and kl_end 4, step 1 has
    lambda_k = 0.375 = 0.75 lambda_0, so each routed token's GRPO weight is exactly 0.25 and every
    other valid token's is 1; at step 0 (lambda_k = lambda_0) routed tokens get no GRPO term at all."""
    seen = Recorder(monkeypatch)
    weights_seen, loss = [], trace.policy_loss

    def recording_loss(logprobs, old_logprobs, advantages, weights, *args, **kwargs):
        weights_seen.append((seen.step, weights.detach().clone()))
        return loss(logprobs, old_logprobs, advantages, weights, *args, **kwargs)

    monkeypatch.setattr(trace, "policy_loss", recording_loss)
    trace.main([*FAST, "--num_steps", "2", "--route", "both", "--annotator", "oracle", "--kl_hold", "0",
                "--kl_end", "4", "--output_dir", str(tmp_path)])
    logged = records(next(tmp_path.iterdir()))
    assert [r["lambda_k"] for r in logged] == [0.5, 0.375]
    for step, fade in ((0, 0.0), (1, 0.25)):
        weights = torch.cat([w.flatten() for s, w in weights_seen if s == step])
        tokens = round(logged[step]["response_len"] * 16)
        routed = round((logged[step]["share_fkl"] + logged[step]["share_rkl"]) * tokens)
        assert routed > 0
        assert int((weights == 1).sum()) == tokens - routed  # N: full GRPO weight
        if fade:
            assert int((weights == fade).sum()) == routed  # S: faded, not 1 and not 0
            assert set(weights.unique().tolist()) <= {0.0, fade, 1.0}
        else:
            assert int((weights > 0).sum()) == tokens - routed


@pytest.mark.parametrize("norm", ["token", "span"])
def test_loss_does_not_depend_on_the_micro_batch_split(norm, tmp_path):
    logged = []
    for size in ("64", "3"):
        trace.main([*FAST, "--num_steps", "1", "--route", "both", "--annotator", "oracle", "--kl_norm", norm,
                    "--micro_batch_size", size, "--output_dir", str(tmp_path / size)])
        logged.append(records(next((tmp_path / size).iterdir()))[0])
    assert logged[0]["kl_loss"] > 0
    for key in ("loss", "kl_loss", "grad_norm", "kl_routed"):
        assert logged[0][key] == pytest.approx(logged[1][key], rel=1e-5), key


def test_several_minibatches_clamp_and_span_norm_run(tmp_path):
    trace.main([*FAST, "--num_steps", "2", "--route", "both", "--annotator", "oracle", "--num_minibatches", "2",
                "--kl_clip_mode", "clamp", "--kl_norm", "span", "--micro_batch_size", "3",
                "--output_dir", str(tmp_path)])
    logged = records(next(tmp_path.iterdir()))
    assert len(logged) == 2 and all(math.isfinite(r["loss"]) and r["kl_loss"] > 0 for r in logged)
    assert all(r["kl_routed_bounded"] <= 0.05 + 1e-6 for r in logged)  # clamp: every routed D' <= kl_clip


@pytest.mark.parametrize("flags, message", [
    (["--annotator", "oracle", "--dataset", "some/hub-id"], "toy task only"),
    (["--annotator", "api"], "--annotator_url"),
    (["--kl_hold", "20", "--kl_end", "10"], "--kl_end 10"),
    (["--alpha", "1.5"], "--alpha 1.5"),
    (["--teacher_sync_every", "0"], "--teacher_sync_every 0"),
])
def test_bad_options_are_clear_errors(flags, message, tmp_path):
    with pytest.raises(UserError, match=message.replace("-", r"\-")):
        trace.main([*flags, "--output_dir", str(tmp_path)])


# ---- end to end -----------------------------------------------------------------------------------------


def test_end_to_end_oracle_random_self(tmp_path):
    runs = {}
    self_flags = ["--route", "both", "--annotator_patience", "0"]  # the toy cannot annotate
    for annotator, extra in [("oracle", []), ("random", []), ("self", self_flags)]:
        out = tmp_path / annotator
        run_script([sys.executable, "trace.py", *FAST, "--num_steps", "3", "--annotator", annotator, *extra,
                    "--output_dir", str(out)])
        run_dir = next(out.iterdir())
        runs[annotator] = records(run_dir)
        assert [r["step"] for r in runs[annotator]] == [1, 2, 3]
        assert (run_dir / "tokens.html").exists()
    assert all(r["annotation_success"] == 1 for r in runs["oracle"] + runs["random"] if r["annotated"])
    # the same step-1 rollouts: random spans are length-matched to the oracle's
    assert runs["random"][0]["share_fkl"] == runs["oracle"][0]["share_fkl"]
    assert runs["random"][0]["coverage"] == runs["oracle"][0]["coverage"]
    annotated = [r for r in runs["self"] if r["annotated"]]
    assert annotated and all(0 <= r["annotation_success"] <= 1 for r in annotated)


def test_torchrun_two_ranks(tmp_path):
    """2 steps on 2 CPU ranks (FSDP2); a frozen copy refreshed at step 0 scores step 1 exactly like the live
    weights (the copy between sharded models is right)."""
    logged = {}
    for sync in ("10", "1"):
        out = tmp_path / f"sync{sync}"
        run_script(torchrun(2) + ["trace.py", *FAST, "--num_steps", "2", "--route", "both", "--annotator", "oracle",
                                  "--teacher_sync_every", sync, "--output_dir", str(out)], timeout=900)
        logged[sync] = records(next(out.iterdir()))
    copy, live = logged["10"], logged["1"]
    assert [r["step"] for r in copy] == [1, 2] and all(r["annotated"] == 16 for r in copy)  # both ranks' rollouts
    assert all(r["share_fkl"] + r["share_rkl"] > 0 and math.isfinite(r["kl_routed"]) for r in copy)
    assert [r["teacher_refreshes"] for r in copy] == [1, 1] and [r["teacher_refreshes"] for r in live] == [0, 0]
    for key in ("kl_routed", "loss", "share_fkl", "share_rkl"):
        assert copy[0][key] == pytest.approx(live[0][key], rel=1e-5, abs=1e-7), key


# ---- the name shared with the standard library's `trace` ------------------------------------------------


def test_nothing_needs_the_standard_library_trace_and_import_is_quiet(tmp_path):
    before = sorted(p.name for p in ROOT.iterdir())
    result = run_script([sys.executable, "-c", "import sys, torch, transformers, datasets, common; "
                         "print(sorted(m for m in sys.modules if m == 'trace' or m.startswith('trace.')))"])
    assert result.stdout.strip().splitlines()[-1] == "[]"  # none of them imports a `trace`
    result = run_script([sys.executable, "-c", "import trace, torch.distributed as d; "
                         "print(trace.__file__, d.is_initialized())"])
    assert result.stdout.strip() == f"{ROOT / 'trace.py'} False"  # ours, and importing it does nothing
    result = run_script([sys.executable, "trace.py", "--help"])
    assert "--route" in result.stdout and "--annotator" in result.stdout
    assert sorted(p.name for p in ROOT.iterdir()) == before
