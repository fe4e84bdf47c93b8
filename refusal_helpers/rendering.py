"""Plotly figures that draw in every notebook frontend, online or offline, and in exported HTML.

``setup_plots()`` (the notebook's setup cell) makes ``fig.show()`` output two representations:

- the plotly mime type ``application/vnd.plotly.v1+json``, which JupyterLab 4, Notebook 7 (through the
  jupyterlab-plotly extension that the ``plotly`` package installs) and VS Code draw with their own
  plotly.js: no network, and no trust needed, since it is data, not a script;
- a ``text/html`` fallback for everything else (``jupyter nbconvert --to html``, Colab's saved outputs,
  classic frontends): a div and a script that draws with ``window.Plotly`` if a page has it, else with the
  copy of plotly.js that ``setup_plots`` inlined into its own output, else with plotly.js from the CDN.

The inlined copy is gzip-compressed and base64-encoded (2.0 MB instead of 4.8 MB for plotly.js 4.1)
and unpacked by the browser (``DecompressionStream``) only when a fallback figure first needs it, so an
exported notebook draws its figures offline and a JupyterLab page never unpacks it. In Colab, where each
output lives in its own iframe and cannot see the setup cell's copy, plotly's own "colab" renderer (CDN
per output) is kept.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import itertools
import json
import sys
from functools import lru_cache

import plotly.io as pio
from plotly.io.base_renderers import MimetypeRenderer, PlotlyRenderer
from plotly.offline import get_plotlyjs, get_plotlyjs_version

RENDERER = "refusal_helpers"  # its name in plotly.io.renderers
LOADER = "refusalHelpersPlotly"  # the page-global JS function that unpacks the inlined plotly.js
PLOTLY_MIME = "application/vnd.plotly.v1+json"
_figure_numbers = itertools.count()

# Unpacks the gzip+base64 plotly.js once, on first call; define/module/exports are hidden so that the bundle
# sets window.Plotly even on pages with require.js (plotly.js 2 and 3 would register an AMD module there).
_LOADER_JS = """\
window.PlotlyConfig = {MathJaxConfig: "local"};
(function () {
  var packed = "%(packed)s", loading = null;
  function unpack() {
    if (typeof DecompressionStream === "undefined") {
      return Promise.reject(new Error("this browser has no DecompressionStream"));
    }
    var bytes = Uint8Array.from(atob(packed), function (c) { return c.charCodeAt(0); });
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return new Response(stream).text().then(function (code) {
      new Function("define", "module", "exports", code).call(window);
      return window.Plotly;
    });
  }
  window.%(loader)s = function () {
    if (window.Plotly) { return Promise.resolve(window.Plotly); }
    loading = loading || unpack();
    return loading;
  };
})();"""

# Draws one figure with the first plotly.js available: the page's, the inlined copy, the CDN's.
# Only window.Plotly is read, never a bare `Plotly`, so a missing library is a message, not a page error.
_FIGURE_JS = """\
(function () {
  var div = document.getElementById("%(id)s"), figure = %(figure)s;
  if (!div) { return; }
  function fromCdn() {
    if (!window.__refusalHelpersCdn) {
      window.__refusalHelpersCdn = new Promise(function (resolve, reject) {
        var script = document.createElement("script"), amd = window.define;
        window.define = undefined;  // load as a plain script even where require.js is on the page
        script.src = "%(cdn)s";
        script.onload = function () { window.define = amd; resolve(window.Plotly); };
        script.onerror = function () { window.define = amd; reject(new Error("cannot load " + script.src)); };
        document.head.appendChild(script);
      });
    }
    return window.__refusalHelpersCdn;
  }
  var plotly = window.Plotly ? Promise.resolve(window.Plotly)
    : window.%(loader)s ? window.%(loader)s().catch(fromCdn) : fromCdn();
  plotly.then(function (lib) {
    return lib.newPlot(div, figure.data, figure.layout || {}, figure.config);
  }).catch(function (err) {
    div.style.height = "auto";
    div.textContent = "This figure needs plotly.js: run the notebook's setup cell, or open the page online (" + err + ").";
  });
})();"""


@lru_cache(maxsize=1)
def packed_plotlyjs() -> str:
    """plotly.js of the installed plotly package, gzip-compressed (reproducibly) and base64-encoded."""
    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), 9, mtime=0)).decode("ascii")


def cdn_url() -> str:
    """The CDN address of the plotly.js version the installed plotly package is made for."""
    return f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"


def loader_html() -> str:
    """The script that makes the inlined plotly.js available to the page's fallback figures, with a note."""
    script = _LOADER_JS % {"packed": packed_plotlyjs(), "loader": LOADER}
    note = (f"<span style='color:#888;font-size:0.85em'>Figures: plotly.js {get_plotlyjs_version()} "
            "is embedded in this output, so they also draw in HTML exports and offline.</span>")
    return f"<script type='text/javascript'>\n{script}\n</script>\n{note}"


def _script_json(value) -> str:
    """JSON that is safe inside a <script> element."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def figure_html(figure: dict) -> str:
    """The HTML fallback for one figure (a plotly mime bundle's JSON): a div and the script that draws into it."""
    text = _script_json(figure)
    div_id = f"refusal-helpers-plot-{hashlib.sha1(text.encode()).hexdigest()[:10]}-{next(_figure_numbers)}"
    layout = figure.get("layout", {})
    width = f"{layout['width']}px" if layout.get("width") else "100%"
    script = _FIGURE_JS % {"id": div_id, "figure": text, "cdn": cdn_url(), "loader": LOADER}
    return (f"<div id='{div_id}' class='plotly-graph-div' style='height:{layout.get('height', 525)}px;"
            f"width:{width}'></div>\n<script type='text/javascript'>\n{script}\n</script>")


class NotebookPlotRenderer(MimetypeRenderer):
    """The plotly mime type plus an HTML fallback that works online, offline and in exported HTML."""

    def __init__(self) -> None:
        self.config = {"responsive": True}  # the fallback div follows the output area's width

    def to_mimebundle(self, fig_dict: dict) -> dict:
        bundle = PlotlyRenderer(config=self.config).to_mimebundle(fig_dict)
        figure = bundle[PLOTLY_MIME]
        title = (figure.get("layout", {}).get("title") or {}).get("text") or "untitled"
        return {**bundle, "text/html": figure_html(figure), "text/plain": f"<plotly figure: {title}>"}


def setup_plots(colab: bool | None = None) -> str:
    """Make ``fig.show()`` draw in this notebook's frontend and in its exports; returns the renderer's name.

    Outside Colab, displays the inlined plotly.js once (this cell's output) for the HTML fallback.
    `colab` defaults to whether google.colab is imported.
    """
    if colab is None:
        colab = "google.colab" in sys.modules
    if colab:
        pio.renderers.default = "colab"
        return "colab"
    pio.renderers[RENDERER] = NotebookPlotRenderer()
    pio.renderers.default = RENDERER
    from IPython import get_ipython

    if get_ipython() is not None:
        from IPython.display import display

        display({"text/html": loader_html(), "text/plain": "plotly.js embedded for the figures' HTML fallback"},
                raw=True)
    return RENDERER
