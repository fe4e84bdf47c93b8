"""Plotly figures for candidates, selection scores, projections and evaluation results."""

from __future__ import annotations

import html

import plotly.graph_objects as go
import torch
from jaxtyping import Float
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor

from .directions import cosine_similarity_matrix, projection
from .selection import ScoreTable, Selection, SelectionConfig, layer_mask


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's text decoded on its own: '\\n' for the byte-level token 'Ċ', ' bread' for 'Ġbread'.

    Special tokens are kept as written ('<|im_end|>'); a SentencePiece word-start token keeps its space.
    """
    texts = []
    for token_id, raw in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        text = tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        if raw.startswith("\u2581") and not text.startswith(" "):  # SentencePiece drops a leading space on decode
            text = " " + text
        texts.append(text)
    return texts


def position_colors(n: int) -> list[str]:
    """One colour per template position, the same in every figure that shows positions."""
    palette = qualitative.Plotly if n <= len(qualitative.Plotly) else qualitative.Alphabet
    return [palette[i % len(palette)] for i in range(n)]


def _position_label(position: int, tokens: list[str] | None) -> str:
    """'-1 '\\n'': the position and its token's text, escaped for plotly's HTML-like labels."""
    label = f"{position} {tokens[position]!r}" if tokens else str(position)
    return html.escape(label, quote=False)  # '<|im_end|>' would otherwise be read as a tag and vanish


def _legend_entry(fig: go.Figure, name: str, line: dict | None) -> None:
    """A legend-only item: a line style, or a grey square (line=None) for a shaded region."""
    if line is None:
        trace = go.Scatter(x=[None], y=[None], mode="markers", name=name,
                           marker=dict(symbol="square", size=14, color="grey", opacity=0.3))
    else:
        trace = go.Scatter(x=[None], y=[None], mode="lines", name=name, line=line)
    fig.add_trace(trace, row=1, col=1)


def plot_selection_scores(
    table: ScoreTable,
    selection: Selection | None = None,
    config: SelectionConfig | None = None,
    position_tokens: list[str] | None = None,
) -> go.Figure:
    """The three selection scores per layer, one line per position, with baselines and the choice marked.

    `position_tokens` label the legend; pass decoded text (`token_texts`), one entry per template token.
    """
    titles = ("Refusal score on harmful prompts, direction ablated (bypass)",
              "Refusal score on harmless prompts, direction added (induce)",
              "KL divergence on harmless prompts, direction ablated")
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.07)
    layers = list(range(table.shape[1]))
    colors = position_colors(len(table.positions))
    for row, scores in enumerate((table.bypass, table.induce, table.kl), start=1):
        for p, position in enumerate(table.positions):
            values = [None if v != v else float(v) for v in scores[p].tolist()]
            fig.add_trace(
                go.Scatter(x=layers, y=values, mode="lines+markers", name=_position_label(position, position_tokens),
                           legendgroup=str(position), showlegend=row == 1,
                           line=dict(color=colors[p]), marker=dict(size=4, color=colors[p])),
                row=row, col=1,
            )
    # Baselines, thresholds and the excluded layers are named in the legend: labels drawn in the panels
    # would cover the score lines or each other.
    for row, baseline in ((1, table.baseline_harmful), (2, table.baseline_harmless)):
        fig.add_hline(y=baseline, line_dash="dot", line_color="black", row=row, col=1)
    _legend_entry(fig, "baseline (no intervention)", dict(color="black", dash="dot"))
    if config is not None:
        fig.add_hline(y=config.induce_threshold, line_dash="dash", line_color="grey", row=2, col=1)
        fig.add_hline(y=config.kl_threshold, line_dash="dash", line_color="grey", row=3, col=1)
        _legend_entry(fig, f"thresholds (induce ≥ {config.induce_threshold:g}, KL ≤ {config.kl_threshold:g})",
                      dict(color="grey", dash="dash"))
        first_excluded = int(layer_mask(1, len(layers), config.max_layer_fraction).sum())
        if first_excluded < len(layers):
            fig.add_vrect(x0=first_excluded - 0.5, x1=len(layers) - 0.5, fillcolor="grey", opacity=0.12, line_width=0)
            _legend_entry(fig, f"excluded layers (from {first_excluded})", None)
    if selection is not None:
        for row, value in enumerate((selection.bypass, selection.induce, selection.kl), start=1):
            fig.add_trace(go.Scatter(x=[selection.layer], y=[value], mode="markers", showlegend=row == 1,
                                     name=f"selected (pos {selection.position}, layer {selection.layer})",
                                     legendgroup="selected", marker=dict(symbol="star", size=14, color="black")),
                          row=row, col=1)
    fig.update_xaxes(title_text="layer", row=3, col=1)
    fig.update_layout(height=850, title="Direction selection scores per candidate", legend_title="position")
    return fig


def plot_direction_norms(
    candidates: Float[Tensor, "pos layer d_model"], positions: list[int], position_tokens: list[str] | None = None
) -> go.Figure:
    """Norm of each candidate direction per layer, one line per position (colours as in the selection plot)."""
    norms = candidates.norm(dim=-1)
    colors = position_colors(len(positions))
    fig = go.Figure()
    for p, position in enumerate(positions):
        fig.add_trace(go.Scatter(y=norms[p].tolist(), mode="lines+markers", name=_position_label(position, position_tokens),
                                 line=dict(color=colors[p]), marker=dict(color=colors[p])))
    fig.update_layout(title="Norm of the difference of means per layer", xaxis_title="layer",
                      yaxis_title="||mean(harmful) - mean(harmless)||", legend_title="position")
    return fig


def plot_cosine_similarity(candidates_at_position: Float[Tensor, "layer d_model"], title: str = "") -> go.Figure:
    """Heatmap of cosine similarity between the candidate directions of different layers."""
    sim = cosine_similarity_matrix(candidates_at_position.detach().cpu()).numpy()  # any device, grad or not
    fig = go.Figure(go.Heatmap(z=sim, zmin=-1, zmax=1, colorscale="RdBu", reversescale=True))
    fig.update_layout(title=title or "Cosine similarity of candidate directions across layers",
                      xaxis_title="layer", yaxis_title="layer", width=600, height=550)
    return fig


def plot_projections(
    harmful_acts: Float[Tensor, "n layer d_model"],
    harmless_acts: Float[Tensor, "n layer d_model"],
    direction: Float[Tensor, " d_model"],
    title: str = "",
) -> go.Figure:
    """Projection of each prompt's activation onto the direction, per layer, harmful vs harmless."""
    fig = go.Figure()
    for name, acts, color in (("harmful", harmful_acts, "crimson"), ("harmless", harmless_acts, "steelblue")):
        proj = projection(acts.float(), direction.float())  # (n, layer)
        n, n_layers = proj.shape
        jitter = (torch.rand(n, n_layers) - 0.5) * 0.3
        x = (torch.arange(n_layers).expand(n, n_layers) + jitter).flatten().tolist()
        fig.add_trace(go.Scatter(x=x, y=proj.flatten().tolist(), mode="markers", name=name,
                                 marker=dict(color=color, size=4, opacity=0.4)))
        fig.add_trace(go.Scatter(x=list(range(n_layers)), y=proj.mean(0).tolist(), mode="lines",
                                 name=f"{name} mean", line=dict(color=color, width=3)))
    fig.update_layout(title=title or "Projection onto the refusal direction per layer", xaxis_title="layer",
                      yaxis_title="projection onto r̂")
    return fig


def plot_refusal_rates(rates: dict[str, float], title: str = "Refusal rate by condition") -> go.Figure:
    """Bar chart of refusal rates, e.g. {"harmful / baseline": 0.95, ...}."""
    names = list(rates)
    values = [rates[n] for n in names]
    colors = ["crimson" if n.startswith("harmful") else "steelblue" for n in names]
    fig = go.Figure(go.Bar(x=names, y=values, marker_color=colors, text=[f"{v:.0%}" for v in values],
                           textposition="outside"))
    fig.update_layout(title=title, yaxis=dict(title="refusal rate", range=[0, 1.1], tickformat=".0%"))
    return fig


# ----- where the direction comes from, and how a jailbreak suppresses it ---------------------------------
def plot_formation_cosines(cosine: Float[Tensor, "checkpoint layer"], steps: list[int], selected_layer: int) -> go.Figure:
    """Heatmap: each training checkpoint's candidate at every layer, cosine with the finally selected direction."""
    fig = go.Figure(go.Heatmap(z=cosine.tolist(), x=list(range(cosine.shape[1])), y=[f"step {s}" for s in steps],
                               zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, colorbar=dict(title="cosine")))
    fig.add_vline(x=selected_layer, line_dash="dot", annotation_text=f"selected layer {selected_layer}")
    fig.update_layout(title="Cosine of each checkpoint's candidates with the final direction", xaxis_title="layer",
                      yaxis_title="training checkpoint", height=450)
    return fig


def plot_formation_curves(steps: list[int], series: dict[str, list[float]], norm: list[float], norm_label: str) -> go.Figure:
    """Refusal rates (and cosine) over training steps, with the direction's norm on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for name, values in series.items():
        fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name), secondary_y=False)
    fig.add_trace(go.Scatter(x=steps, y=norm, mode="lines+markers", name=norm_label, line=dict(dash="dot", color="black")),
                  secondary_y=True)
    fig.update_layout(title="Refusal appears as the direction grows and settles", xaxis_title="training step",
                      height=420)
    fig.update_yaxes(title_text="rate or cosine", range=[-0.05, 1.05], secondary_y=False)
    fig.update_yaxes(title_text="norm of the difference of means", secondary_y=True)
    return fig


def plot_layer_projections(projections: dict[str, Float[Tensor, "n layer"]], title: str = "") -> go.Figure:
    """Mean projection on r̂ per layer (with one standard deviation), one line per set of prompts."""
    fig = go.Figure()
    for (name, values), color in zip(projections.items(), qualitative.Plotly):
        mean, std = values.mean(0), values.std(0) if values.shape[0] > 1 else torch.zeros(values.shape[1])
        fig.add_trace(go.Scatter(x=list(range(len(mean))), y=mean.tolist(), mode="lines+markers", name=name,
                                 line=dict(color=color), error_y=dict(type="data", array=std.tolist(), visible=True)))
    fig.update_layout(title=title or "Projection of the residual stream on the refusal direction",
                      xaxis_title="layer", yaxis_title="projection on r̂ (last template token)", height=450)
    return fig


def plot_head_contributions(contributions: Float[Tensor, "layer head"], title: str) -> go.Figure:
    """Heatmap of each attention head's direct contribution to the projection on r̂."""
    limit = float(contributions.abs().max())
    fig = go.Figure(go.Heatmap(z=contributions.tolist(), zmin=-limit, zmax=limit, colorscale="RdBu", reversescale=True,
                               colorbar=dict(title="on r̂")))
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", height=520)
    return fig
