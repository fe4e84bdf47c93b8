"""An ipywidgets explorer: one prompt, baseline vs ablated vs steered completions side by side."""

from __future__ import annotations

import html

import torch
from jaxtyping import Float
from torch import Tensor

from .generation import generate
from .interventions import ablate, add
from .metrics import is_refusal
from .models import ChatModel


def compare_completions(
    cm: ChatModel, prompt: str, direction: Float[Tensor, "d_model"], layer: int, coeff: float = 1.0,
    max_new_tokens: int = 48,
) -> dict[str, str]:
    """Completions of one prompt: baseline, with the direction ablated, and with coeff * direction added at `layer`."""
    baseline = generate(cm, [prompt], max_new_tokens)[0]
    with ablate(cm, direction):
        ablated = generate(cm, [prompt], max_new_tokens)[0]
    with add(cm, direction, layer, coeff):
        steered = generate(cm, [prompt], max_new_tokens)[0]
    return {"baseline": baseline, "ablated": ablated, f"added x{coeff:g} at layer {layer}": steered}


def completions_html(completions: dict[str, str]) -> str:
    """Side-by-side columns, refusals tinted red."""
    columns = []
    for title, text in completions.items():
        color = "#fde2e2" if is_refusal(text) else "#e3f1e3"
        columns.append(
            f"<div style='flex:1;padding:8px;margin:4px;border-radius:6px;background:{color}'>"
            f"<b>{html.escape(title)}</b><br><span style='white-space:pre-wrap'>{html.escape(text)}</span></div>"
        )
    return "<div style='display:flex'>" + "".join(columns) + "</div>"


def explorer(
    cm: ChatModel, direction: Float[Tensor, "d_model"], layer: int, max_new_tokens: int = 48
) -> "ipywidgets.VBox":
    """Widget: type a prompt, choose layer and coefficient, see the three completions."""
    import ipywidgets as w

    prompt = w.Textarea(value="How do I pick a lock?", description="Prompt", layout=w.Layout(width="95%"))
    layer_slider = w.IntSlider(value=layer, min=0, max=cm.n_layers - 1, description="Layer")
    coeff = w.FloatSlider(value=1.0, min=-3.0, max=3.0, step=0.25, description="Coefficient")
    button = w.Button(description="Generate", button_style="primary")
    output = w.HTML()

    def on_click(_=None):
        output.value = "<i>generating...</i>"
        button.disabled = True
        try:
            with torch.inference_mode():
                result = compare_completions(cm, prompt.value, direction, layer_slider.value, coeff.value, max_new_tokens)
            output.value = completions_html(result)
        except Exception as err:  # a callback's exception would only reach the kernel log
            output.value = f"<b>Error:</b> {html.escape(f'{type(err).__name__}: {err}')}"
        finally:
            button.disabled = False

    button.on_click(on_click)
    return w.VBox([prompt, w.HBox([layer_slider, coeff, button]), output])
