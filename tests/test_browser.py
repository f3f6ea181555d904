"""04 in a real browser: JupyterLab, headless Chromium driven by Playwright, Run All Cells, then the explorer.

It proves what only a browser shows: the explorer's widgets render (the front end loads their models), picking
another model changes the answers shown and moving a slider changes the rate table (the kernel answers the
browser), and the browser console shows no widget error. The second test runs the same check in a kernel where
the explorer's observers are never connected (an IPython startup file, switched on by its kernelspec's
environment) and expects both changes to go unanswered, so the check cannot pass on an explorer that stopped
responding.

Needs Debian's `chromium` (/usr/bin/chromium; EM_CHROMIUM overrides) and the `playwright` Python package; skipped
without them. 04 reads what 01-03 made and its judgments: they are made first, headless, in the session's run
directory (tests/conftest.py), where tests/test_run.py and nbmake reuse them, so the browser run of 04 judges
nothing again. Every wait is bounded; on a failure the message names a folder holding a screenshot, the browser
console and JupyterLab's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers.config import PROJECT_ROOT, make_config
from helpers.run import require

CHROMIUM = Path(os.environ.get("EM_CHROMIUM", "/usr/bin/chromium"))
playwright_api = pytest.importorskip("playwright.sync_api", reason="no playwright: pip install playwright")
pytestmark = [pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"no Chromium at {CHROMIUM}: apt-get install chromium"),
              pytest.mark.notebook]

NOTEBOOK = PROJECT_ROOT / "notebooks" / "04_analyze.ipynb"
TOKEN = "em-browser-test"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDGET_WORDS = ("widget", "ipywidgets", "jupyter-widgets")
DEAF_KERNEL = "python3-deaf-widgets"
DEAF_SWITCH = "EM_TEST_DEAF_WIDGETS"
# IPython startup file of every test kernel; active only in the deaf kernel. It drops every observer that is
# not ipywidgets' own plumbing (the explorer's, from helpers/ or a notebook cell): the explorer draws once,
# then never hears a change, as if its `observe` line were gone.
DEAF_STARTUP = f"""\
import os
if os.environ.get({DEAF_SWITCH!r}):
    import ipywidgets
    _observe = ipywidgets.Widget.observe
    def _deaf_observe(self, handler, *args, **kwargs):
        if getattr(handler, "__module__", "").split(".")[0] in ("ipywidgets", "traitlets", "comm", "ipykernel"):
            return _observe(self, handler, *args, **kwargs)
        return None
    ipywidgets.Widget.observe = _deaf_observe
"""
LAB_START_S = 90  # JupyterLab answering its REST API
PAGE_S = 90  # the notebook open in Lab with its kernel ready
RUN_ALL_S = 180  # Run All Cells of 04 with the judgments already stored (about 15 s on 2 cores)
WIDGET_S = 30  # the explorer's widgets drawn after the run
CHANGE_S = 10  # the explorer answering a change (well under a second when it works)
TEST_S = 300  # the whole test: past this the alarm fails it, whatever it was waiting on


@pytest.fixture(scope="module")
def run_dir() -> Path:
    """The session's tiny run directory with 01-03's artefacts and 04's judgments (notebooks run headless when
    missing)."""
    cfg = make_config()
    try:
        require(cfg, "03")
        require(cfg, "04")
    except SystemExit as error:  # helpers.run names the notebook and cell that failed
        pytest.fail(f"could not make 04's inputs headless: {error}")
    return cfg.run_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, method: str = "GET"):
    request = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def _kernel_pids(runtime_dir: Path) -> list[int]:
    """Processes whose command line names a connection file of this Lab (its kernels)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(runtime_dir).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _shut_kernels(url: str) -> None:
    """Shut down every kernel of this Lab through its REST API (nothing when the server is gone)."""
    try:
        for session in _api(url, "/api/sessions"):
            _api(url, f"/api/sessions/{session['id']}", method="DELETE")
    except OSError:
        pass


def _stop(lab: subprocess.Popen, url: str, runtime_dir: Path) -> None:
    """Shut the kernels down through the server, then end the server's process group and any kernel left."""
    _shut_kernels(url)
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if lab.poll() is None:
            os.killpg(lab.pid, sig)
            try:
                lab.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
    for pid in _kernel_pids(runtime_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory, run_dir):
    """JupyterLab on a free port with a fixed token, serving a temporary folder (never the repository: Lab saves
    outputs); its kernels run the tiny profile in `run_dir`. Two kernels: `python3`, and the deaf one."""
    root = tmp_path_factory.mktemp("lab")
    data = root / ".data"
    (root / ".ipython" / "profile_default" / "startup").mkdir(parents=True)
    (root / ".ipython" / "profile_default" / "startup" / "00-deaf-widgets.py").write_text(DEAF_STARTUP)
    (data / "kernels" / DEAF_KERNEL).mkdir(parents=True)
    (data / "kernels" / DEAF_KERNEL / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (explorer deaf)", "language": "python", "env": {DEAF_SWITCH: "1"}}))
    news = root / ".settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false"}))  # no "get notified about Jupyter news?" toast over the page
    env = {**os.environ, "EM_PROFILE": "tiny", "EM_RUN_DIR": str(run_dir), "IPYTHONDIR": str(root / ".ipython"),
           "JUPYTER_RUNTIME_DIR": str(root / ".runtime"), "JUPYTER_CONFIG_DIR": str(root / ".config"),
           "JUPYTER_DATA_DIR": str(data), "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(DEAF_SWITCH, None)
    port = _free_port()
    log_path = root / "lab.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", f"--port={port}",
             "--ServerApp.ip=127.0.0.1", "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
             f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.extension_manager=readonly", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             f"--LabApp.user_settings_dir={root / '.settings'}", f"--LabApp.workspaces_dir={root / '.workspaces'}"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + LAB_START_S
        while True:
            try:
                _api(url, "/api/status")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"JupyterLab did not start within {LAB_START_S} s (exit code {server.poll()});"
                                         f" its log, {log_path}:\n{log_path.read_text()[-3000:]}") from None
                time.sleep(0.25)
        yield url, root
    finally:
        _stop(server, url, root / ".runtime")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def alarm():
    """Fail the test, whatever it waits on, once it has run TEST_S seconds."""
    def expire(signum, frame):
        pytest.fail(f"the browser test ran past {TEST_S} s and was stopped")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class Session:
    """One notebook open in one page; `fail` saves a screenshot, the console and Lab's log into `evidence`."""

    def __init__(self, browser, url: str, root: Path, name: str, kernel: str, evidence: Path) -> None:
        notebook = json.loads(NOTEBOOK.read_text())
        notebook["metadata"]["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
        (root / name).write_text(json.dumps(notebook))
        self.root, self.name, self.evidence, self.console = root, name, evidence, []
        self.page = browser.new_page(viewport={"width": 1400, "height": 1000})
        self.page.set_default_timeout(30_000)
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.url = url

    def open(self) -> None:
        """Open the notebook in Lab; its front end is scripted through `window.jupyterapp` once that exists."""
        # ?reset: a fresh layout, not the one the previous test left (with its notebook open in another tab)
        self.page.goto(f"{self.url}/lab/tree/{self.name}?reset&token={TOKEN}", timeout=PAGE_S * 1000)
        self.page.wait_for_function("() => window.jupyterapp !== undefined", timeout=PAGE_S * 1000)

    def fail(self, message: str):
        self.evidence.mkdir(parents=True, exist_ok=True)
        try:
            self.page.screenshot(path=str(self.evidence / "screenshot.png"), full_page=True, timeout=15_000)
        except Exception as error:  # noqa: BLE001 (the failure below matters more than a missing screenshot)
            message += f"\n(no screenshot: {error})"
        (self.evidence / "console.log").write_text("\n".join(self.console))
        shutil.copy(self.root / "lab.log", self.evidence / "lab.log")
        raise AssertionError(f"{message}\nScreenshot, browser console and JupyterLab log: {self.evidence}")

    def run_all(self) -> None:
        """Wait for the notebook and its kernel, Run All Cells, and fail naming the first cell with an error."""
        errors = self.page.evaluate("""async ([path, pageMs, runMs]) => {
            const within = (promise, ms, what) => Promise.race([promise, new Promise((_, reject) =>
                setTimeout(() => reject(new Error(`${what}: not done within ${ms / 1000} s`)), ms))]);
            const app = window.jupyterapp;
            await within(app.started, pageMs, 'JupyterLab starting');
            await within(app.restored, pageMs, 'JupyterLab restoring its layout');
            const find = () => [...app.shell.widgets('main')].find(widget => widget.context?.path === path);
            let panel = find();
            for (let waited = 0; !panel && waited < pageMs; waited += 250) {
                await new Promise(resolve => setTimeout(resolve, 250));
                panel = find();
            }
            if (!panel) throw new Error(`${path} did not open`);
            app.shell.activateById(panel.id);  // Run All Cells acts on the active notebook
            await within(panel.context.ready, pageMs, 'the notebook loading');
            await within(panel.sessionContext.ready, pageMs, 'the kernel starting');
            if (!panel.sessionContext.session?.kernel) throw new Error('no kernel: ' + panel.sessionContext.kernelDisplayName);
            await within(app.commands.execute('notebook:run-all-cells'), runMs, 'Run All Cells');
            const errors = [];
            panel.content.widgets.forEach((cell, index) => {
                if (cell.model.type !== 'code') return;
                for (const output of cell.model.outputs.toJSON())
                    if (output.output_type === 'error')
                        errors.push(`cell ${index}: ${output.ename}: ${output.evalue}\\n${output.traceback.join('\\n')}`);
                if (cell.model.executionCount === null) errors.push(`cell ${index} did not run`);
            });
            return errors;
        }""", [self.name, PAGE_S * 1000, RUN_ALL_S * 1000])
        if errors:
            self.fail("04 failed in the browser:\n" + re.sub(r"\x1b\[[0-9;]*m", "", errors[0])[-4000:])

    def check_explorer(self) -> None:
        """The widgets render; picking another model changes the answers shown and moving the aligned slider
        changes the rate table, within CHANGE_S seconds; the console shows no widget error."""
        page = self.page
        explorer = page.locator(".jp-OutputArea-output").filter(has=page.locator(".widget-dropdown")).last
        try:
            explorer.locator(".widget-slider .noUi-handle").first.wait_for(timeout=WIDGET_S * 1000)
            explorer.locator("table").first.wait_for(timeout=WIDGET_S * 1000)
        except playwright_api.Error as error:
            shown = page.locator(".jp-OutputArea-output", has_text="Error displaying widget")
            self.fail(f"the explorer did not render within {WIDGET_S} s ({error.message.splitlines()[0]})"
                      + (f": {shown.first.inner_text()[:500]}" if shown.count() else ""))
        model = explorer.locator(".widget-dropdown select").first
        options = [o.strip() for o in model.locator("option").all_inner_texts()]
        if len(options) < 2:
            self.fail(f"the explorer's first dropdown offers {options}; expected two models or more")
        table = explorer.locator("table").first
        problems, deadline = [], time.monotonic() + CHANGE_S

        def changes(locator, before: str) -> bool:
            while locator.inner_text() == before and time.monotonic() < deadline:
                page.wait_for_timeout(100)
            return locator.inner_text() != before

        before = explorer.inner_text()
        current = model.evaluate("select => select.options[select.selectedIndex].text").strip()
        # the fine-tune: on the tiny profile its answers differ from the base model's (the positive control, trained on
        # noise, may answer as the base does)
        other = "finetuned" if "finetuned" in options and current != "finetuned" else next(o for o in reversed(options) if o != current)
        model.select_option(label=other)
        if not changes(explorer, before):
            problems.append(f"picking another model ({current} -> {other}) did not change the answers shown")
        table_before = table.inner_text()
        # The first slider, "misaligned below", to its maximum (End key): every kept answer now counts as
        # misaligned, so the counts change (the tiny judge's scores sit far from 100).
        handle = explorer.locator(".widget-slider .noUi-handle").first
        handle.focus()
        handle.press("End")
        if not changes(table, table_before):
            problems.append("moving the aligned slider to its maximum did not change the rate table")
        report = [f"the explorer does not respond within {CHANGE_S} s:\n- " + "\n- ".join(problems)] if problems else []
        widget_errors = [m for m in self.console if m.startswith(("error", "pageerror"))
                         and any(word in m.lower() for word in WIDGET_WORDS)]
        if widget_errors:
            report.append("the browser console shows widget errors:\n" + "\n".join(widget_errors))
        if report:
            self.fail("\n".join(report))

    def close(self) -> None:
        self.page.close()


def explore(browser, lab, name: str, kernel: str, evidence: Path) -> None:
    url, root = lab
    session = Session(browser, url, root, name, kernel, evidence)
    try:
        session.open()
        session.run_all()
        session.check_explorer()
    except playwright_api.Error as error:  # a timeout or a script error in the page: the same evidence
        session.fail(f"the browser check stopped: {error.message}")
    finally:
        session.close()
        _shut_kernels(url)  # free the kernel (two cores) before the next test


def test_explorer_responds_in_the_browser(lab, browser, tmp_path, alarm):
    explore(browser, lab, "04_analyze.ipynb", "python3", tmp_path / "evidence")


def test_browser_check_fails_when_the_explorer_stops_responding(lab, browser, tmp_path, alarm):
    try:
        explore(browser, lab, "04_analyze-deaf.ipynb", DEAF_KERNEL, tmp_path / "evidence")
    except AssertionError as failure:
        message = str(failure)
    else:
        pytest.fail("the explorer answered changes in a kernel that drops its observers: the deaf kernel no longer"
                    " silences it (does the explorer register its handlers some other way?)")
    assert "does not respond" in message, f"the check failed for another reason than a deaf explorer:\n{message}"
    assert "did not change the answers shown" in message and "did not change the rate table" in message, (
        f"in a kernel where the explorer hears no change, both checks must fail:\n{message}")
    assert (tmp_path / "evidence" / "screenshot.png").is_file(), "a failure saved no screenshot"
