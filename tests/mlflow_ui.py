"""The MLflow UI in a real headless browser, used as a person uses it: for tests/test_mlflow_ui.py
and for the screenshots of docs/tracking.md.

    python -m tests.mlflow_ui RUN_ID CHILD_RUN_ID --out docs/images   # store: MLFLOW_TRACKING_URI

Needs Debian's chromium (`apt-get install chromium`) and Playwright from pip; Playwright's own
browser download is not used.
"""

import argparse
import contextlib
import html
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from cnnpipe.base.localhost import free_port, wait_for_http
from cnnpipe.tracking.store import MODEL_TRAINING, ui_link

CHROMIUM = "/usr/bin/chromium"
# MLflow 3 opens an assistant panel on the first visit; a person closes it once, and the browser
# remembers. The Model training views are not remembered here: every page is opened by a link
# that asks for them, as cnnpipe's links do (ui_link), so the tests see what a newcomer sees.
REMEMBERED = """
localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
"""
TIMEOUT_MS = 60_000


@contextlib.contextmanager
def mlflow_server(store_uri: str, start_s: float = 120) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1 for `store_uri`; yields its base URL."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1"]
    server = subprocess.Popen(
        [*cmd, "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/health", server, "mlflow server", deadline_s=start_s)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


@contextlib.contextmanager
def browser(remembered: str = REMEMBERED) -> Iterator[Page]:
    """A page of headless Chromium whose storage holds `remembered` ("" for none)."""
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        context = chromium.new_context(viewport={"width": 1500, "height": 950})
        if remembered:
            context.add_init_script(remembered)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            chromium.close()


def as_a_newcomer(link: str, run_name: str) -> dict:
    """Open `link` in a browser with no stored state, as someone who has never used the UI, until
    `run_name` shows: the address it landed on and the links the page offers (its sidebar holds
    the experiment's views: Runs and Models in Model training, Evaluation runs in GenAI)."""
    with browser(remembered="") as page:
        page.goto(link)
        page.get_by_text(run_name).first.wait_for()
        return {"url": page.url, "links": links_shown(page)}


def artifact_as_a_newcomer(link: str, run_name: str, folder: str, file: str) -> dict:
    """Open the run at `link` as a newcomer (`as_a_newcomer`), then its Artifacts tab and the
    `file` in `folder` there, as a person clicks them: the links the page offers and the text
    of the page with the file's preview."""
    with browser(remembered="") as page:
        page.goto(link)
        page.get_by_text(run_name).first.wait_for()
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text(folder, exact=True).first.click()
        page.get_by_text(file, exact=True).first.click()
        page.get_by_text(re.compile(r"Previewing the first \d+ rows")).wait_for()
        return {"links": links_shown(page), "preview": page.locator("body").inner_text()}


def links_shown(page: Page) -> list[str]:
    """The text of every link on the page, read at once (the page may still re-render)."""
    return page.evaluate(
        "() => [...document.querySelectorAll('a')].map(a => a.innerText.trim()).filter(t => t)"
    )


def open_runs(page: Page, base: str, experiment_id: str) -> list[str]:
    """The experiment's runs table; returns the run names it shows (sweeps collapsed)."""
    page.goto(ui_link(experiment_id, base=base))
    page.get_by_text(re.compile(r"\d+ matching runs?")).wait_for()
    names = page.locator("[role=gridcell][col-id='attributes.`Run Name`']")
    names.first.wait_for()
    # Each cell shows the run's colour code, then its name.
    return [n.inner_text().strip().splitlines()[-1] for n in names.all()]


def val_acc_chart(page: Page, base: str, experiment_id: str, run_id: str) -> dict:
    """The run's "Model metrics" tab searched for val/acc: the x axis and the points drawn."""
    page.goto("about:blank")  # a fresh page: the tab keeps its charts from before otherwise
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODEL_TRAINING}")
    page.locator(".js-plotly-plot").first.wait_for()
    page.get_by_placeholder("Search metric charts").fill("val/acc")
    # The search applies after a pause: the train section, drawn first, goes when it has.
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    headers.filter(has_text="train").wait_for(state="detached")
    chart = page.locator(".js-plotly-plot")
    chart.first.wait_for()
    page.locator(".scatterlayer .point").first.wait_for()
    return {
        "charts": chart.count(),
        "x_title": page.locator(".g-xtitle text").first.text_content(),
        "x_ticks": [float(t.text_content()) for t in page.locator(".xtick text").all()],
        "points": page.locator(".scatterlayer .point").count(),
    }


def model_metrics_as_opened(page: Page, base: str, experiment_id: str, run_id: str) -> dict:
    """The run's "Model metrics" tab as it opens, without a search: its sections in order, and
    the charts drawn first, in order, as (section, title, "line" or "bar")."""
    page.goto("about:blank")
    page.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{MODEL_TRAINING}")
    page.locator(".js-plotly-plot").first.wait_for()
    headers = page.get_by_test_id("experiment-view-compare-runs-section-header")
    sections = [h.inner_text().splitlines()[0].strip() for h in headers.all()]
    charts = []
    # Each section's cards follow its header; MLflow draws the cards near the view only.
    for card in page.get_by_test_id("experiment-view-compare-runs-card").all():
        card.locator(".js-plotly-plot").wait_for()
        section = card.locator(
            "xpath=preceding::*[@data-testid='experiment-view-compare-runs-section-header'][1]"
        )
        kind = "line" if card.locator(".scatterlayer .point").count() else "bar"
        title = card.inner_text().strip().splitlines()[0]
        charts.append((section.inner_text().splitlines()[0].strip(), title, kind))
    return {"sections": sections, "charts": charts}


def logged_models(page: Page, base: str, experiment_id: str) -> dict[str, dict[str, str]]:
    """The experiment's "Models" tab: for each logged model, the metric columns its row fills
    (metric: the text shown, each column one metric on one dataset, named "metric @ dataset")."""
    # The table draws only the columns in view; a person scrolls right, the test widens the view.
    size = page.viewport_size
    page.set_viewport_size({"width": 3200, "height": size["height"]})
    page.goto(f"{base}/#/experiments/{experiment_id}/models?{MODEL_TRAINING}")
    page.locator("[role=gridcell][col-id=name]").first.wait_for()
    cells = page.evaluate(
        """() => [...document.querySelectorAll('[role=row][row-index] [role=gridcell][col-id]')]
            .map(c => [c.closest('[role=row]').getAttribute('row-index'),
                       c.getAttribute('col-id'), c.innerText.trim()])"""
    )
    page.set_viewport_size(size)
    names = {row: text.splitlines()[-1] for row, col, text in cells if col == "name"}
    shown: dict[str, dict[str, str]] = {name: {} for name in names.values()}
    for row, col, text in cells:
        if col.startswith("metrics.{") and text:
            column = json.loads(html.unescape(col.removeprefix("metrics.")))
            shown[names[row]][f"{column['metricKey']} @ {column['datasetName']}"] = text
    return shown


def compare(page: Page, base: str, experiment_id: str, names: list[str]) -> None:
    """Tick the runs named (opening the sweeps their rows are in) and press Compare."""
    open_runs(page, base, experiment_id)
    for parent in page.get_by_role("row").filter(has_text="sweep:").all():
        parent.get_by_role("button").first.click()
    for name in names:
        row = page.get_by_role("row").filter(has_text=name).first
        row.get_by_role("checkbox", name=re.compile("toggle row selection")).check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Show diff only").first.wait_for()


def params_shown_with_diff_only(page: Page, params: dict[str, dict[str, str]]) -> set[str]:
    """On the compare page of the runs whose `params` are given (run id: params), switch the
    parameters to "Show diff only"; returns the parameter keys still shown."""
    keys = {key for p in params.values() for key in p}
    same = sorted(k for k in keys if len({p.get(k) for p in params.values()}) == 1)
    page.get_by_role("switch").first.click()
    if same:  # the table has re-rendered when a row of equal values has gone
        page.get_by_role("cell", name=same[0], exact=True).wait_for(state="detached")
    shown = {row.inner_text().split("\t")[0].strip() for row in page.get_by_role("row").all()}
    return shown & keys


def main() -> None:
    import mlflow

    parser = argparse.ArgumentParser(
        description="Screenshots of the MLflow UI for docs/tracking.md"
    )
    parser.add_argument("run_id", help="the pipeline run")
    parser.add_argument("child_run_id", help="a sweep child to compare it with")
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    run = mlflow.MlflowClient(uri).get_run(args.run_id)
    child = mlflow.MlflowClient(uri).get_run(args.child_run_id)
    experiment = run.info.experiment_id
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_server(uri) as base, browser() as page:
        open_runs(page, base, experiment)
        page.screenshot(path=args.out / "mlflow-runs.png")
        page.goto(ui_link(experiment, args.run_id, base))
        page.get_by_text("Description").first.wait_for()
        page.screenshot(path=args.out / "mlflow-run.png")
        model_metrics_as_opened(page, base, experiment, args.run_id)
        page.screenshot(path=args.out / "mlflow-model-metrics.png")
        page.set_viewport_size({"width": 2600, "height": 400})
        page.goto(f"{base}/#/experiments/{experiment}/models?{MODEL_TRAINING}")
        page.locator("[role=gridcell][col-id=name]").first.wait_for()
        page.screenshot(path=args.out / "mlflow-models.png")
        page.set_viewport_size({"width": 1500, "height": 950})
        compare(page, base, experiment, [run.info.run_name, child.info.run_name])
        params_shown_with_diff_only(page, {r.info.run_id: r.data.params for r in (run, child)})
        page.get_by_text("Parameters", exact=True).last.scroll_into_view_if_needed()
        page.screenshot(path=args.out / "mlflow-compare.png")
    print(f"wrote 5 screenshots to {args.out}")


if __name__ == "__main__":
    main()
