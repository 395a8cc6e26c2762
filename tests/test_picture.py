"""The token picture: a self-contained HTML page of rollouts coloured by a per-token value."""

import re

import common


def test_token_picture_colours_escapes_and_is_self_contained(tmp_path):
    rows = [{"tokens": ["<think>", "\n", "1", "+", "1"], "values": [0.0, float("nan"), -2.0, 1.0, 2.0],
             "hover": ["", "", "bonus=+0.1", "", ""], "label": "reward 1 | <b>x</b>"},
            {"tokens": ["\\boxed{", "2", "}"], "values": [0.5, 2.0, -0.5]}]
    path = common.write_token_picture(tmp_path / "sub" / "tokens.html", rows, "u_t", title="t")
    page = path.read_text()
    assert page.count('class="row"') == 2
    cells = re.findall(r'<span class="t" style="background:(rgb\([0-9,]+\)|transparent)(;color:#fff)?" '
                       r'title="([^"]*)">(.*?)</span>', page)
    assert len(cells) == 8
    colours = [c for c, _, _, _ in cells]
    # scale = 95th percentile of |values| = 2.0: saturated at +-2, white at 0, half at +-1, NaN uncoloured
    assert colours[:5] == ["rgb(255,255,255)", "transparent", "rgb(0,0,255)", "rgb(255,128,128)", "rgb(255,0,0)"]
    assert colours[7] == "rgb(191,191,255)"
    assert [bool(white) for _, white, _, _ in cells] == [False, False, True, False, True, False, True, False]
    assert "&lt;think&gt;" in cells[0][3] and "\u21b5<br>" in cells[1][3]  # escaped, newline drawn
    assert "u_t=-2.000  bonus=+0.1" in cells[2][2]
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert not re.search(r"<script|<link|src=|https?://", page)  # nothing external
