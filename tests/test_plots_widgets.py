import pytest
import torch

from refusal_helpers import plots
from refusal_helpers.activations import mean_activations
from refusal_helpers.generation import generate
from refusal_helpers.interventions import ablate, active_hook_count, add
from refusal_helpers.selection import SelectionConfig, choose
from refusal_helpers.widgets import compare_completions, completions_html, explorer
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


def test_explorer_and_side_by_side_completions(llama):
    prompt, layer, coeff, n = HARMFUL[0], 1, 2.0, 6
    # the prompt's own mean residual direction at `layer`: ablating or adding it changes the greedy text
    r = mean_activations(llama, [prompt])[-1, layer].float()
    out = compare_completions(llama, prompt, r, layer=layer, coeff=coeff, max_new_tokens=n)
    assert list(out) == ["baseline", "ablated", "added x2 at layer 1"]
    expected = {"baseline": generate(llama, [prompt], n)[0]}
    with ablate(llama, r):
        expected["ablated"] = generate(llama, [prompt], n)[0]
    with add(llama, r, layer, coeff):
        expected["added x2 at layer 1"] = generate(llama, [prompt], n)[0]
    assert out == expected
    assert len(set(out.values())) == 3  # the three conditions give three different texts
    with add(llama, r, layer):  # and the coefficient matters
        assert generate(llama, [prompt], n)[0] != out["added x2 at layer 1"]
    assert active_hook_count(llama) == 0
    html = completions_html({"a": "I'm sorry, I cannot <b>", "b": "Sure"})
    assert "&lt;b&gt;" in html and "#fde2e2" in html and "#e3f1e3" in html
    widget = explorer(llama, r, layer=1, max_new_tokens=2)
    button = widget.children[1].children[2]
    widget.children[0].value = HARMLESS[0]
    button.click()
    assert "baseline" in widget.children[2].value and not button.disabled
    # an error inside the callback is shown in the widget, not only in the kernel log
    explorer_bad = explorer(llama, r[:-1], layer=1, max_new_tokens=2)  # wrong size: the hooks refuse it
    explorer_bad.children[1].children[2].click()
    assert "Error:" in explorer_bad.children[2].value and "d_model" in explorer_bad.children[2].value
    assert not explorer_bad.children[1].children[2].disabled and active_hook_count(llama) == 0
