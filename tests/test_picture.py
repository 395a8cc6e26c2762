"""The pictures: the token picture (a self-contained HTML page of rollouts coloured by a per-token
value on a fixed scale, categories, an underline, marked rows), the methods' rows, the comparison
figure and PACED's SNR figure."""

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comparison  # noqa: E402

CELL = re.compile(r'<span class="t" style="background:(rgb\([0-9,]+\)|transparent|#[0-9a-f]+)'
                  r'(;color:#fff)?(;border-bottom:4px solid rgb\(([0-9]+),[0-9]+,[0-9]+\))?" '
                  r'title="([^"]*)">(.*?)</span>')
RED_HALF, RED, BLUE = "rgb(255,128,128)", "rgb(255,0,0)", "rgb(0,0,255)"
WHITE = "rgb(255,255,255)"


def cells(page):
    """(background, white text, underline shade or None, hover, shown text) per token."""
    return [(bg, bool(white), int(shade) if shade else None, tip, text)
            for bg, white, _, shade, tip, text in CELL.findall(page)]


def picture(tmp_path, rows, scale, name="v", **kwargs):
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.html"
    return common.write_token_picture(path, rows, name, scale, **kwargs).read_text()


def test_token_picture_colours_escapes_and_is_self_contained(tmp_path):
    rows = [{"tokens": ["<think>", "\n", "1", "+", "1"], "values": [0.0, math.nan, -2.0, 1.0, 2.0],
             "hover": ["", "", "bonus=+0.1", "", ""], "label": "reward 1 | <b>x</b>"},
            {"tokens": ["\\boxed{", "2", "}"], "values": [0.5, 2.0, -0.5]}]
    path = common.write_token_picture(tmp_path / "sub" / "tokens.html", rows, "u_t", (-2.0, 2.0),
                                      title="t")
    page = path.read_text()
    assert page.count('class="row"') == 2
    found = cells(page)
    assert len(found) == 8
    # the scale (-2, 2): saturated at +-2, white at 0, half at +-1, NaN uncoloured
    assert [c[0] for c in found[:5]] == [WHITE, "transparent", BLUE, RED_HALF, RED]
    assert found[7][0] == "rgb(191,191,255)"
    assert [c[1] for c in found] == [False, False, True, False, True, False, True, False]
    assert "&lt;think&gt;" in found[0][4] and "\u21b5<br>" in found[1][4]  # escaped, newline drawn
    assert "u_t=-2.000  bonus=+0.1" in found[2][3]
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert not re.search(r"<script|<link|src=|https?://", page)  # nothing external


def test_the_scale_is_fixed_not_taken_from_the_data(tmp_path):
    """The same value gets the same colour in every picture, whatever else the picture holds: a
    picture of small values stays pale (per-file rescaling would saturate it)."""
    early = picture(tmp_path, [{"tokens": list("abcd"), "values": [0.5, 1.9, -1.9, 0.1]}],
                    (-1.0, 1.0), "u_t")
    late = picture(tmp_path, [{"tokens": list("abc"), "values": [0.5, 0.1, -0.1]}], (-1.0, 1.0),
                   "u_t")
    assert [c[0] for c in cells(early)] == [RED_HALF, RED, BLUE, "rgb(255,230,230)"]
    assert [c[0] for c in cells(late)] == [RED_HALF, "rgb(255,230,230)", "rgb(230,230,255)"]
    for page in (early, late):  # the legend names the fixed ends and says the scale is fixed
        assert "<span>u_t = -1</span>" in page and "<span>1</span>" in page
        assert "fixed scale, the same in every picture" in page
        assert (f"linear-gradient(to right, {BLUE}, rgb(128,128,255), {WHITE}, {RED_HALF}, {RED})"
                in page)


def test_a_one_sided_scale_runs_white_to_red(tmp_path):
    page = picture(tmp_path, [{"tokens": list("abcde"), "values": [0.0, 0.5, 1.0, 3.0, -1e-9]}],
                   (0.0, 1.0), "D_t")
    assert [c[0] for c in cells(page)] == [WHITE, RED_HALF, RED, RED, WHITE]
    assert "<span>D_t = 0</span>" in page
    assert f"linear-gradient(to right, {WHITE}, {RED_HALF}, {RED})" in page  # no blue half
    with pytest.raises(ValueError, match="low <= 0 < high"):
        picture(tmp_path, [], (0.5, 1.0))


def test_categories_get_their_own_colours_and_swatches(tmp_path):
    kinds = {1.0: ("fkl", "#66c2a5"), -1.0: ("rkl", "#fc8d62"), 0.0: ("GRPO only", "transparent")}
    page = picture(tmp_path, [{"tokens": list("abcd"), "values": [1.0, -1.0, 0.0, -0.0],
                               "hover": ["D=0.5", "D=0.2", "", ""]}], kinds, "route")
    found = cells(page)
    assert [c[0] for c in found] == ["#66c2a5", "#fc8d62", "transparent", "transparent"]
    assert not any(c[1] for c in found)
    assert "route=fkl  D=0.5" in found[0][3] and "route=rkl  D=0.2" in found[1][3]
    assert "route=GRPO only" in found[2][3]
    assert "linear-gradient" not in page and "fixed scale" not in page  # no continuous bar
    swatches = r'<span class="swatch" style="background:([^"]+)"></span><span>([^<]+)</span>'
    assert re.findall(swatches, page) == [("#66c2a5", "fkl"), ("#fc8d62", "rkl"),
                                          ("transparent", "GRPO only")]


def test_the_underline_draws_a_second_quantity_on_its_own_fixed_scale(tmp_path):
    page = picture(tmp_path, [{"tokens": list("abcde"), "values": [0.2] * 5,
                               "underline": [1.0, 1.25, 1.5, 2.0, 3.0]}], (-1.0, 1.0), "a_t",
                   underline=("w_t", 1.0, 2.0))
    found = cells(page)
    assert [c[2] for c in found] == [255, 191, 128, 0, 0]
    assert "a_t=0.200  w_t=1.500" in found[2][3]
    assert "underline: w_t = 1</span>" in page and "<span>2</span>" in page
    plain = picture(tmp_path, [{"tokens": ["a"], "values": [0.2]}], (-1.0, 1.0))
    assert [c[2] for c in cells(plain)] == [None] and "underline" not in plain


def test_marked_rows(tmp_path):
    page = picture(tmp_path, [{"tokens": ["a"], "values": [0.1], "label": "one", "mark": "bad <x>"},
                              {"tokens": ["b"], "values": [0.1], "label": "two"}], (0.0, 1.0))
    assert page.count('class="row marked"') == 1 and page.count('class="row"') == 1
    assert '<div class="label"><div class="mark">bad &lt;x&gt;</div>one</div>' in page


# ---- the methods' rows


def test_iw_opd_rows_carry_w_t_as_the_underline(toy_tokenizer, tmp_path):
    import types

    import iw_opd

    response = toy_tokenizer.encode("7+3=10\n\\boxed{10}", add_special_tokens=False)
    n = len(response)
    mask = torch.arange(n + 2)[None, :] < n  # one row padded by two positions
    a = torch.nn.functional.pad(torch.linspace(-1, 1, n), (0, 2))[None]
    w = torch.nn.functional.pad(torch.linspace(1.5, 1.0, n), (0, 2))[None]
    args = iw_opd.Args(picture_rollouts=4)
    run = types.SimpleNamespace(args=args, tokenizer=toy_tokenizer, dir=tmp_path)
    rollouts = types.SimpleNamespace(responses=[response], rewards=[1.0],
                                     problems=[{"problem": "p"}])
    drawn = iw_opd.picture(run, rollouts, 3, a, w, mask)
    (row,) = drawn["rows"]
    assert row["underline"] == pytest.approx(w[0, :n].tolist())
    assert row["values"] == pytest.approx(a[0, :n].tolist())
    assert row["hover"][0] == "A_t=w_t*a_t=-1.500" and row["label"] == "step 3 | reward 1\np"
    assert iw_opd.W_SCALE == (1.0, 2.0) and iw_opd.A_SCALE == (-1.0, 1.0)
    assert drawn["scale"] == iw_opd.A_SCALE and drawn["underline"] == ("w_t", *iw_opd.W_SCALE)
    page = picture(tmp_path, [row], iw_opd.A_SCALE, "a_t", underline=("w_t", *iw_opd.W_SCALE))
    assert cells(page)[0][2] == 128  # w_1 = 1.5: half way


def test_trace_rows_are_routing_categories(toy_tokenizer):
    import trace

    response = toy_tokenizer.encode("7+3=10", add_special_tokens=False)
    route = torch.tensor([[1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0]])  # one column of padding
    kl = torch.full(route.shape, 0.25)
    run = SimpleNamespace(args=trace.Args(num_generations=1), tokenizer=toy_tokenizer, dir=Path("r"))
    rollouts = SimpleNamespace(responses=[response], rewards=[1.0], problems=[{"problem": "p"}])
    drawn = trace.picture(run, rollouts, 2, route, kl, ["key"])
    (row,) = drawn["rows"]
    assert row["values"] == route[0, :6].tolist() and set(row["values"]) <= set(trace.ROUTE_COLOURS)
    assert row["hover"] == ["D=0.2500", "D=0.2500", "", "D=0.2500", "", ""]
    assert row["tokens"] == list("7+3=10") and row["label"] == "step 2 | reward 1 | key\np"
    assert drawn["scale"] == trace.ROUTE_COLOURS and drawn["title"] == "r: routing per token"
    assert trace.picture(run, rollouts, 2, route, kl, [""])["rows"][0]["label"].startswith("step 2 | reward 1 | -\n")
    colours = [colour for _, colour in trace.ROUTE_COLOURS.values()]
    assert len(set(colours)) == 3 and not any(c.startswith("rgb(") for c in colours)


def test_paced_marks_wrong_references(toy_tokenizer):
    import paced

    problems = [{"problem": "Start at 1, apply +1.", "answer": "2"},
                {"problem": "Start at 2, apply +2.", "answer": "4"}]
    owner = [0, 1, 0]
    sequences = [toy_tokenizer.encode(text, add_special_tokens=False)
                 for text in ["1+1=2\n\\boxed{2}", "2+2=5\n\\boxed{5}", "1+1=3\n\\boxed{3}"]]
    width = max(len(s) for s in sequences)
    mask = torch.tensor([[t < len(s) for t in range(width)] for s in sequences])
    d = torch.where(mask, 0.1, 0.0)
    grader = common.Grader()
    run = SimpleNamespace(tokenizer=toy_tokenizer, grader=grader, dir=Path("runs/r"),
                          args=SimpleNamespace(mode="distill", kl="fkl"))
    try:
        page = paced.picture(run, problems, 4, [0, 1, 2], owner, sequences, d, d, d, mask,
                             torch.tensor([0.5, 0.25]), torch.tensor([1.2, 0.8]))
    finally:
        grader.close()
    rows = page["rows"]
    wrong = "wrong answer (the teacher's reference)"
    assert [row["mark"] for row in rows] == ["", wrong, wrong]
    assert rows[1]["label"].startswith("step 4 | p 0.250 | w~ 0.800")
    assert [len(row["values"]) for row in rows] == [len(s) for s in sequences]  # no padding
    assert page["scale"] == paced.D_SCALE == (0.0, 1.0)  # one-sided: D_t is never negative


# ---- the figures


def dashes(line):
    """A line's dash pattern (get_linestyle() reads "--" for every custom pattern)."""
    return str(getattr(line, "_unscaled_dash_pattern", line.get_linestyle()))


def test_comparison_figure_keeps_every_curve_and_the_reference_visible(tmp_path):
    """Identical curves (GRPO hidden under another before): the baseline is drawn on top and every
    method has its own colour, line style and marker; the reference is a labelled line."""
    runs = [[{"step": s, comparison.EVAL_KEY: 0.3 + s / 100, "careful_frac": 0.5}
             for s in range(0, 61, 10)]]
    results = {"GRPO": runs, "A": runs, "B": runs, "C": runs, "D": runs}
    figure = comparison.draw(results, tmp_path / "c.png", 1, {"teacher toy-large": 0.778})
    assert (tmp_path / "c.png").stat().st_size > 0
    left, right = figure.axes
    for axis in (left, right):
        lines = {line.get_label(): line for line in axis.get_lines()}
        methods = [lines[m] for m in results]
        # colour, line style (a custom dash pattern reads "--": compare the pattern), marker
        looks = [(line.get_color(), dashes(line), line.get_marker()) for line in methods]
        assert [len(set(look)) for look in zip(*looks)] == [5, 5, 5]
        assert methods[0].get_color() == "black" and methods[0].get_linestyle() == "--"
        assert methods[0].get_marker() == "o" and methods[0].get_fillstyle() == "none"
        assert methods[0].get_zorder() > max(line.get_zorder() for line in methods[1:])
    teacher = [line for line in left.get_lines() if line.get_label() == "teacher toy-large: 0.778"]
    assert len(teacher) == 1 and list(teacher[0].get_ydata()) == [0.778, 0.778]
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [*results, "teacher toy-large: 0.778"]


def test_comparison_reference_is_measured_once_and_read_back(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(comparison.subprocess, "run", lambda command, **kw: calls.append(command))
    for seed, value in [(0, 0.75), (1, 0.79)]:
        run_dir = tmp_path / f"reference_toy-large_s{seed}"
        run_dir.mkdir()
        (run_dir / "metrics.jsonl").write_text(f'{{"step": 0, "{comparison.EVAL_KEY}": {value}}}\n')
    measured = comparison.reference_accuracy("iw_opd.py", "toy-large", [0, 1], str(tmp_path))
    assert measured == pytest.approx(0.77) and calls == []  # both measured: nothing run
    with pytest.raises(IndexError):  # seed 2 not measured: it runs (a stub here: writes nothing)
        comparison.reference_accuracy("iw_opd.py", "toy-large", [2], str(tmp_path))
    assert calls[0][1:] == ["iw_opd.py", "--eval_only", "--model", "toy-large", "--seed", "2",
                            "--output_dir", str(tmp_path), "--run_name", "reference_toy-large_s2"]


def test_snr_figure_draws_the_floor_and_the_bin_counts(tmp_path):
    import paced

    counts = [[5, 25, 17, 9, 1, 0], [7, 23, 19, 11, 3, 2]]
    records = [{"step": 5 * (i + 1), **{f"snr_n/{b}": n for b, n in zip(paced.BINS, c)},
                **{f"snr/{b}": 0.3 if n >= 2 else math.nan for b, n in zip(paced.BINS, c)}}
               for i, c in enumerate(counts)]
    figure = paced.draw_snr(records, tmp_path / "snr.png")
    assert (tmp_path / "snr.png").stat().st_size > 0
    top, bottom = figure.axes
    (floor,) = [line for line in top.get_lines() if line.get_label().startswith("pure-noise floor")]
    expected = [(1 / 2 + 1 / math.sqrt(6)) / 2, (1 / math.sqrt(24) + 1 / math.sqrt(22)) / 2,
                (1 / 4 + 1 / math.sqrt(18)) / 2, (1 / math.sqrt(8) + 1 / math.sqrt(10)) / 2,
                1 / math.sqrt(2), 1.0]  # the last two: only the steps with an SNR there
    assert list(floor.get_ydata()) == pytest.approx(expected)
    assert [bar.get_height() for bar in bottom.patches] == [6, 24, 18, 10, 2, 1]
    labels = [t.get_text() for t in bottom.texts]
    assert labels == ["6.0", "24.0", "18.0", "10.0", "2.0\nSNR at 1/2", "1.0\nSNR at 1/2"]
    assert paced.snr_floor(5) == 0.5 and math.isnan(paced.snr_floor(1))
