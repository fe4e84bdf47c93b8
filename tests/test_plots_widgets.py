import base64
import gzip
import json
import re

import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

from refusal_helpers import plots, rendering
from refusal_helpers.activations import mean_activations
from refusal_helpers.generation import generate
from refusal_helpers.interventions import ablate, active_hook_count, add
from refusal_helpers.selection import SelectionConfig, choose
from refusal_helpers.testing import tiny_tokenizer
from refusal_helpers.widgets import ABLATED, BASELINE, added_title, compare_completions, completions_html, explorer
from tests.conftest import HARMFUL, HARMLESS
from tests.test_selection import crafted_table


def test_selection_plot_has_a_line_per_position_and_score_and_marks_the_choice():
    table, config = crafted_table(), SelectionConfig()
    selection = choose(table, config)
    fig = plots.plot_selection_scores(table, selection, config, ["<a>", "<b>"])
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert len(lines) == 3 * len(table.positions)
    stars = [t for t in fig.data if t.marker.symbol == "star"]
    assert [t.x[0] for t in stars] == [selection.layer] * 3 and stars[0].y[0] == selection.bypass
    assert lines[0].y[3] == float(table.bypass[0, 3]) and lines[len(table.positions) + 1].y[0] == float(table.induce[1, 0])


def test_selection_plot_gives_each_position_one_colour_in_every_panel_and_labels_in_the_legend():
    table, config = crafted_table(), SelectionConfig()
    fig = plots.plot_selection_scores(table, choose(table, config), config, ["<|im_end|>", "\n"])
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    colours = {}
    for trace in lines:  # plotly's own cycling would give the induce and KL panels other colours
        colours.setdefault(trace.legendgroup, set()).update({trace.line.color, trace.marker.color})
    assert all(len(c) == 1 for c in colours.values()) and len({c.pop() for c in colours.values()}) == len(table.positions)
    assert [t.name for t in lines[:2]] == ["-2 '&lt;|im_end|&gt;'", "-1 '\\n'"]  # plotly would drop a <...> "tag"
    # no text inside the panels but the subplot titles: baselines, thresholds and the shading are legend items
    assert len(fig.layout.annotations) == 3
    legend = [t.name for t in fig.data if t.showlegend is not False and t.mode != "lines+markers"]
    assert any("baseline" in n for n in legend) and any("KL ≤ 0.1" in n for n in legend)
    assert any("excluded layers (from 4)" in n for n in legend)


@pytest.mark.parametrize("n_layers", [28, 30, 10])
def test_selection_plot_shades_exactly_the_excluded_layers(n_layers):
    from refusal_helpers.selection import ScoreTable, layer_mask

    scores = torch.zeros(1, n_layers)
    config = SelectionConfig(max_layer_fraction=0.8)
    fig = plots.plot_selection_scores(ScoreTable([-1], scores, scores, scores, 0.0, 0.0), None, config)
    shades = [s for s in fig.layout.shapes if s.type == "rect"]  # one per subplot
    allowed = layer_mask(1, n_layers, config.max_layer_fraction)[0]
    assert len(shades) == 3
    for shade in shades:
        shaded = [layer for layer in range(n_layers) if shade.x0 < layer < shade.x1]
        assert shaded == [layer for layer in range(n_layers) if not allowed[layer]] and shaded


def test_position_colours_match_between_norms_and_selection_plots():
    table = crafted_table()
    norms = plots.plot_direction_norms(torch.ones(2, 5, 4), table.positions)
    selection = plots.plot_selection_scores(table)
    assert [t.line.color for t in norms.data] == [t.line.color for t in selection.data[:2]]
    assert len(set(plots.position_colors(12))) == 12  # more positions than the default palette: still distinct


def test_token_texts_decode_byte_level_tokens():
    tokenizer = tiny_tokenizer()
    ids = tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    raw = tokenizer.convert_ids_to_tokens(ids)
    assert "Ċ" in raw  # what convert_ids_to_tokens shows for a newline
    texts = plots.token_texts(tokenizer, ids)
    assert texts[0] == "<|im_end|>" and texts[1] == "\n" and "Ċ" not in "".join(texts)
    assert "".join(texts) == "<|im_end|>\n<|im_start|>assistant\n"


def test_projection_cosine_norm_and_rate_plots():
    torch.manual_seed(0)
    r = torch.randn(8)
    harmful, harmless = torch.randn(5, 3, 8) + r, torch.randn(4, 3, 8) - r
    fig = plots.plot_projections(harmful, harmless, r)
    means = [t for t in fig.data if t.mode == "lines"]
    torch.testing.assert_close(torch.tensor(means[0].y), (harmful @ (r / r.norm())).mean(0), atol=1e-5, rtol=0, check_dtype=False)
    assert means[0].y[0] > means[1].y[0]
    heat = plots.plot_cosine_similarity(torch.randn(4, 8)).data[0]
    assert len(heat.z) == 4 and abs(heat.z[2][2] - 1) < 1e-6
    norms = plots.plot_direction_norms(torch.ones(2, 3, 4), [-2, -1])
    assert len(norms.data) == 2 and list(norms.data[0].y) == [2.0, 2.0, 2.0]
    bars = plots.plot_refusal_rates({"harmful / baseline": 0.9, "harmless / baseline": 0.05}).data[0]
    assert list(bars.y) == [0.9, 0.05] and bars.marker.color[0] != bars.marker.color[1]


# ----- rendering in notebooks ------------------------------------------------------------------------
def _fallback_figure(html: str) -> dict:
    """The figure JSON that a bundle's HTML fallback draws."""
    found = re.search(r"figure = (\{.*?\});\n", html, flags=re.S)
    assert found, html[:300]
    return json.loads(found[1])


def test_renderer_bundle_has_the_plotly_mime_type_and_an_html_fallback_of_the_same_figure():
    fig = go.Figure(go.Scatter(y=[1, 3, 2]), layout=dict(title="a </script> title", height=300))
    bundle = rendering.NotebookPlotRenderer().to_mimebundle(fig.to_dict())
    figure = bundle[rendering.PLOTLY_MIME]
    assert figure["data"][0]["y"] == [1, 3, 2] and figure["config"]["responsive"]
    html = bundle["text/html"]
    assert "</script>" not in html.split("<script", 1)[1][:-len("</script>")]  # the title cannot end the script early
    assert _fallback_figure(html) == figure and "height:300px" in html
    # drawn with whichever plotly.js is there: never a bare `Plotly` that a page without it would fail on
    assert "window.Plotly" in html and rendering.LOADER in html and rendering.cdn_url() in html
    assert "Plotly.newPlot" not in html
    ids = set(re.findall(r"id='([^']+)'", html + rendering.figure_html(figure)))
    assert len(ids) == 2  # the same figure shown twice gets two divs


def test_setup_plots_outside_and_inside_colab(monkeypatch):
    monkeypatch.setattr(pio.renderers, "default", pio.renderers.default)
    assert rendering.setup_plots(colab=True) == "colab" and pio.renderers.default == "colab"
    assert rendering.setup_plots(colab=False) == rendering.RENDERER == pio.renderers.default
    packed = rendering.packed_plotlyjs()
    from plotly.offline import get_plotlyjs

    assert gzip.decompress(base64.b64decode(packed)).decode() == get_plotlyjs()
    assert len(packed) < 0.45 * len(get_plotlyjs())  # what keeps the committed notebook small
    assert packed in rendering.loader_html() and f"window.{rendering.LOADER} = function" in rendering.loader_html()


# ----- the explorer ----------------------------------------------------------------------------------
def test_explorer_and_side_by_side_completions(llama):
    prompt, layer, coeff, n = HARMFUL[0], 1, 2.0, 6
    # the prompt's own mean residual direction at `layer`: ablating or adding it changes the greedy text
    r = mean_activations(llama, [prompt])[-1, layer].float()
    seen = []
    out = compare_completions(llama, prompt, r, layer=layer, coeff=coeff, max_new_tokens=n,
                              progress=lambda title, text, count: seen.append((title, text, count)))
    added = added_title(coeff, layer)
    assert list(out) == [BASELINE, ABLATED, added] and added == "r added (coefficient +2) at layer 1"
    expected = {BASELINE: generate(llama, [prompt], n)[0]}
    with ablate(llama, r):
        expected[ABLATED] = generate(llama, [prompt], n)[0]
    with add(llama, r, layer, coeff):
        expected[added] = generate(llama, [prompt], n)[0]
    assert out == expected
    assert len(set(out.values())) == 3  # the three conditions give three different texts
    with add(llama, r, layer):  # and the coefficient matters
        assert generate(llama, [prompt], n)[0] != out[added]
    assert active_hook_count(llama) == 0
    # progress after every token, in order; the last report of each column is its final text
    assert [c for t, _, c in seen if t == BASELINE] == list(range(1, len([1 for t, _, _ in seen if t == BASELINE]) + 1))
    assert {t: text for t, text, _ in seen} == out

    html = completions_html({"a": "I'm sorry, I cannot <b>", "b": "Sure"}, prompt="Why <i>?")
    assert "&lt;b&gt;" in html and "#fde2e2" in html and "#e3f1e3" in html and "Why &lt;i&gt;?" in html
    assert "line-height:1.45" in html  # not the widget row height that double-spaces the text
    pending = completions_html({"a": "I'm", "b": None}, generating="a")
    assert "generating" in pending and "waiting" in pending and "#fde2e2" not in pending

    widget = explorer(llama, r, layer=1, max_new_tokens=2)
    text, controls, progress_row, output = widget.children
    button = controls.children[2]
    assert "refusal-helpers-explorer" in widget._dom_classes and text.value  # a default prompt to try
    text.value = HARMLESS[0]
    button.click()
    assert output.value.count("refusal-helpers-completion") == 3 and "Prompt:</b> Write a poem" in output.value
    assert not button.disabled and progress_row.layout.display == "none"
    assert progress_row.children[0].value > 0  # the bar moved
    # an error inside the callback is shown in the widget, not only in the kernel log
    explorer_bad = explorer(llama, r[:-1], layer=1, max_new_tokens=2)  # wrong size: the hooks refuse it
    explorer_bad.children[1].children[2].click()
    assert "Error:" in explorer_bad.children[3].value and "d_model" in explorer_bad.children[3].value
    assert not explorer_bad.children[1].children[2].disabled and active_hook_count(llama) == 0
