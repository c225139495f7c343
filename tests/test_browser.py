"""The notebooks as a user meets them: JupyterLab, and a real (headless) Chromium. (The `expert-lab lab` command
itself, without a browser, is tests/test_lab.py's.)

`test_train_notebook_and_report_in_chromium`, in three acts, on a throw-away copy of nbs/ (JupyterLab saves and
autosaves what it runs, and the source notebooks must stay clean):
1. start JupyterLab as `expert-lab lab` does (`expert_lab.lab.lab_command`), on loopback, with a known token;
2. open nbs/train_expert.ipynb, check it runs on the `expert-lab` kernel, Run All, wait, and check that every plot the
   kernel sent is drawn and that no cell failed; in JupyterLab (JPY_SESSION_NAME set) the runbook's `smoke` parameter
   (None) turns on by itself, so Run All is the seconds-long digits smoke run, and the test checks that it was;
3. make a run report with `expert-lab train` and check that report.html draws its plots in the browser.
Runs go to temporary runs folders (EXPERT_LAB_RUNS_DIR, which the kernels inherit from the server; --runs-dir).
Screenshots land in tests/artifacts/ (git-ignored), failure.png too when it fails; their paths are printed (-s or -rA).

Needs Debian's chromium and the `playwright` package (bash tools/browser-setup.sh). Without them the browser test is
skipped, unless TEST_REQUIRE_BROWSER=1 (tools/test.sh sets it after running the set-up): then it fails.
"""
from __future__ import annotations
import json, os, secrets, shutil, signal, socket, subprocess, sys, time, urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from expert_lab.config import project_root
from expert_lab.lab import KERNEL_NAME, lab_command
from conftest import HANG_S

ROOT = project_root()
ARTIFACTS = Path(__file__).parent/"artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NOTEBOOK = "nbs/train_expert.ipynb"
MIN_PLOTS = 3  # the runbook draws the partition, a batch, learning curves, the schedule and per-class accuracy


def _chromium() -> str | None:
    for name in (os.environ.get("TEST_CHROMIUM"), "chromium", "chromium-browser"):
        if name and shutil.which(name): return shutil.which(name)
    return None


def _need_browser():
    "Skip (or, when the browser is required, fail) unless Chromium and Playwright are both here."
    missing = []
    if _chromium() is None: missing.append("the chromium executable (Debian package `chromium`)")
    try: import playwright.sync_api  # noqa: F401
    except ImportError: missing.append("the Python package `playwright`")
    if not missing: return
    msg = f"browser test needs {' and '.join(missing)}: run `bash tools/browser-setup.sh`"
    if os.environ.get("TEST_REQUIRE_BROWSER") == "1": pytest.fail(msg + " (TEST_REQUIRE_BROWSER=1)")
    pytest.skip(msg)


# --- the JupyterLab server -------------------------------------------------------------------------------------------

@dataclass
class Lab:
    base: str  # http://127.0.0.1:PORT
    token: str
    log: Path

    def api(self, path: str):
        with urllib.request.urlopen(f"{self.base}/api/{path}?token={self.token}", timeout=HANG_S) as r: return json.load(r)

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True); path.write_text(json.dumps(obj))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _stop(proc: subprocess.Popen):
    "Stop the server so that it shuts its kernels down, then make sure nothing it started is left."
    import psutil
    try: family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess: family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Jupyter's clean exit: kernels are shut down first
        try: proc.wait(HANG_S)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
    for p in family:
        try: p.kill()
        except psutil.NoSuchProcess: pass


def _lab_env(tmp: Path, runs_dir: Path) -> dict:
    "The server's environment: runs go to `runs_dir`, and nothing is read from (or written to) the user's Jupyter set-up."
    env = {**os.environ, "EXPERT_LAB_RUNS_DIR": str(runs_dir), "EXPERT_LAB_ROOT": str(ROOT),
           "JUPYTER_CONFIG_DIR": str(tmp/"jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp/"jupyter-runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp/"lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp/"lab-workspaces"),
           "IPYTHONDIR": str(tmp/"ipython")}
    # no toast asking to fetch Jupyter news (and no request to the internet for it)
    _write_json(tmp/"lab-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    return env


@contextmanager
def lab_server(root: Path, runs_dir: Path, tmp: Path):
    "A JupyterLab on `root`, started with `lab_command`, with user dirs under `tmp` and runs going to `runs_dir`."
    token, port, env = secrets.token_hex(16), _free_port(), _lab_env(tmp, runs_dir)
    log = tmp/"jupyter-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(lab_command(port, open_browser=False, token=token, root=root), env=env, cwd=root,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    lab = Lab(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + HANG_S
        while True:
            if proc.poll() is not None: pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{lab.log_tail()}")
            try: lab.api("status"); break
            except OSError:
                if time.monotonic() > deadline: pytest.fail(f"JupyterLab did not answer within {HANG_S} s:\n{lab.log_tail()}")
                time.sleep(0.5)
        yield lab
    finally:
        _stop(proc)


@contextmanager
def chromium_page(tmp: Path):
    "A page in a fresh headless Chromium profile."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(str(tmp/"chromium-profile"), executable_path=_chromium(),
                                                   headless=True, args=CHROMIUM_ARGS,
                                                   viewport={"width": 1400, "height": 1000})
        try:
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            page.set_default_timeout(60_000)
            yield page
        finally:
            ctx.close()


def shot(page, name: str, **kw) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    p = ARTIFACTS/name
    page.screenshot(path=str(p), **kw)
    print(f"screenshot: {p}")
    return p


# --- driving a notebook ----------------------------------------------------------------------------------------------

_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook in the current tab

# What the page shows of the open notebook: each code cell's prompt ("[ ]:", "[*]:", "[3]:"), drawn images, tracebacks.
_STATE_JS = """() => {
  const nb = document.querySelector('%s .jp-Notebook');
  if (!nb) return null;
  return {
    prompts: [...nb.querySelectorAll('.jp-CodeCell')].map(c => (c.querySelector('.jp-InputArea-prompt')?.textContent || '').trim()),
    images: nb.querySelectorAll('.jp-OutputArea-output img').length,
    tracebacks: [...nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .map(o => o.textContent).filter(t => t.includes('Traceback')).map(t => t.slice(0, 3000)),
    status: document.querySelector('%s .jp-Notebook-ExecutionIndicator')?.getAttribute('data-status'),
  };
}""" % (_PANEL, _PANEL)

# The kernel name in the notebook's toolbar, once the kernel is started and idle.
_KERNEL_JS = """() => {
  const p = document.querySelector('%s');
  const name = p?.querySelector('.jp-NotebookPanel-toolbar .jp-KernelName')?.textContent.trim();
  const status = p?.querySelector('.jp-NotebookPanel-toolbar [data-jp-item-name="executionProgress"]')?.textContent.trim();
  return name && name !== 'No Kernel' && status === 'Kernel status: Idle' ? name : null;
}""" % _PANEL


def open_notebook(page, lab: Lab, path: str) -> str:
    "Open `path` in the lab and wait until its kernel is up and idle; return the kernel name the toolbar shows."
    page.goto(f"{lab.base}/lab/tree/{path}?token={lab.token}")
    page.wait_for_selector(f"{_PANEL} .jp-Notebook .jp-Cell", timeout=HANG_S*1000)
    return page.wait_for_function(_KERNEL_JS, timeout=HANG_S*1000).json_value()


def run_all(page, timeout_s: float) -> dict:
    "Run All Cells from the Run menu and wait until no cell is queued and the kernel is idle; return what the page shows."
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    deadline, started = time.monotonic() + timeout_s, False
    while True:
        st = page.evaluate(_STATE_JS)
        busy = "[*]:" in st["prompts"]
        started = started or busy or any(p[1:-2].isdigit() for p in st["prompts"])
        if started and not busy and st["status"] == "idle": return st
        if time.monotonic() > deadline: raise AssertionError(f"notebook still running after {timeout_s} s: {st}")
        time.sleep(1)


def image_sizes(page, selector: str, shots: dict[int, str] | None = None) -> list[tuple[int, int]]:
    "Natural sizes of the images under `selector`, each looked at on screen; screenshot the page at the ones in `shots`."
    imgs = page.locator(selector)
    sizes = []
    for i in range(imgs.count()):
        img = imgs.nth(i)
        img.scroll_into_view_if_needed()
        page.wait_for_function("i => i.complete", arg=img.element_handle(), timeout=HANG_S*1000)
        sizes.append(tuple(img.evaluate("i => [i.naturalWidth, i.naturalHeight]")))
        if shots and i in shots: shot(page, shots[i])
    return sizes


def save_and_read(page, path: Path, timeout_s: float = 30):
    "Save the open notebook from its toolbar and read back what JupyterLab wrote to `path`."
    import nbformat
    page.locator(f'{_PANEL} [data-jp-item-name="save"]').click()
    deadline = time.monotonic() + timeout_s
    while True:
        nb = nbformat.read(path, as_version=4)
        if all(c.get("execution_count") for c in nb.cells if c.cell_type == "code"): return nb
        if time.monotonic() > deadline: raise AssertionError(f"{path} was not saved with its outputs within {timeout_s} s")
        time.sleep(0.5)


def outputs(nb, kind: str) -> list:
    "The outputs of `nb` that are errors (`kind='error'`) or carry the MIME type `kind`."
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [o for o in outs if o.get("output_type") == kind or kind in o.get("data", {})]


def make_report(runs_dir: Path) -> Path:
    "Train one tiny expert with `expert-lab train` (as a user would) and return its report.html."
    exe = Path(sys.executable).with_name("expert-lab")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from expert_lab.cli import main; sys.exit(main())"]
    cmd += ["train", "--model", "wideresnet10_1", "--dataset", "digits", "--n-experts", "2", "--expert-id", "0",
            "--epochs", "1", "--steps-per-epoch", "2", "--runs-dir", str(runs_dir)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    reports = sorted(runs_dir.rglob("report.html"))
    assert len(reports) == 1, f"expected one report.html under {runs_dir}, found {reports}\n{res.stdout}"
    return reports[0]


@contextmanager
def _diagnose(page, lab: Lab):
    "On failure, keep a screenshot of what the browser showed and print the end of the server's log."
    try: yield
    except BaseException:
        try: shot(page, "failure.png")
        except Exception as e: print(f"no failure screenshot: {e}")
        print(f"--- JupyterLab server log (end) ---\n{lab.log_tail()}")
        raise


# --- the test --------------------------------------------------------------------------------------------------------

@pytest.mark.browser
@pytest.mark.slow
def test_train_notebook_and_report_in_chromium(tmp_path):
    _need_browser()
    import nbformat
    root, runs = tmp_path/"lab", tmp_path/"runs"
    # a copy of nbs/: JupyterLab saves (and autosaves) what it runs, and the source notebooks must stay clean
    shutil.copytree(ROOT/"nbs", root/"nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))

    with lab_server(root, runs, tmp_path) as lab, chromium_page(tmp_path) as page, _diagnose(page, lab):
        specs = lab.api("kernelspecs")
        assert specs["default"] == KERNEL_NAME, f"new notebooks would get {specs['default']!r}, not {KERNEL_NAME!r}"
        display = specs["kernelspecs"][KERNEL_NAME]["spec"]["display_name"]

        # act 1: the lab opens at nbs/ (the default URL) and the runbook opens on the project's kernel
        page.goto(f"{lab.base}/?token={lab.token}")
        page.wait_for_selector(".jp-DirListing-item[title*='train_expert.ipynb']", timeout=HANG_S*1000)
        assert page.url.startswith(f"{lab.base}/lab/tree/nbs"), page.url
        shown = open_notebook(page, lab, NOTEBOOK)
        assert shown == display, f"toolbar shows kernel {shown!r}, expected {display!r} ({KERNEL_NAME})"
        sessions = [s for s in lab.api("sessions") if s["path"] == NOTEBOOK]
        assert [s["kernel"]["name"] for s in sessions] == [KERNEL_NAME], sessions

        # act 2: Run All, then everything the kernel sent is on the page, drawn, and nothing failed
        st = run_all(page, timeout_s=300)
        shot(page, "lab-train-expert-end.png")
        assert not st["tracebacks"], "a cell failed in JupyterLab:\n" + "\n\n".join(st["tracebacks"])
        assert all(p[1:-2].isdigit() for p in st["prompts"]), f"cells left unrun: {st['prompts']}"
        saved = save_and_read(page, root/NOTEBOOK)
        assert outputs(saved, "error") == [], [o.get("evalue") for o in outputs(saved, "error")]
        n_png = len(outputs(saved, "image/png"))
        assert n_png >= MIN_PLOTS, f"the runbook drew {n_png} plots, expected at least {MIN_PLOTS}"
        sizes = image_sizes(page, f"{_PANEL} .jp-OutputArea-output img",
                            shots={0: "lab-train-expert-first-plot.png", n_png - 1: "lab-train-expert-last-plot.png"})
        assert len(sizes) == n_png, f"{n_png} plots in the notebook, {len(sizes)} images on the page"
        assert all(w > 0 and h > 0 for w, h in sizes), f"plots that did not render: {sizes}"
        records = sorted(runs.rglob("metrics.json"))
        assert records, f"the notebook's run folder is not under EXPERT_LAB_RUNS_DIR={runs}"
        [record] = records
        run = record.relative_to(runs).parts  # <model>/<partition>-<n>/expert-<k>/<timestamp>/metrics.json
        assert run[:3] == ("wideresnet10_1", "iid-2", "expert-0"), f"not the smoke run (notebook_run.SMOKE): {run}"
        assert json.loads(record.read_text())["status"] == "completed", record.read_text()[:2000]

        # act 3: a run report made by `expert-lab train` draws its plots in the browser, offline, from a file
        report = make_report(tmp_path/"report-runs")
        report_nb = nbformat.read(report.with_suffix(".ipynb"), as_version=4)
        assert outputs(report_nb, "error") == []
        n_report = len(outputs(report_nb, "image/png"))
        assert n_report >= MIN_PLOTS, f"report.ipynb has {n_report} plots, expected at least {MIN_PLOTS}"
        rpage, page_errors = page.context.new_page(), []  # a new tab: leaving the lab could stop at "leave page?"
        rpage.on("pageerror", lambda e: page_errors.append(str(e)))
        rpage.goto(report.as_uri())
        rpage.wait_for_load_state("load")
        sizes = image_sizes(rpage, "img")
        shot(rpage, "report-html.png", full_page=True)
        assert len(sizes) == n_report, f"{n_report} plots in report.ipynb, {len(sizes)} images in report.html"
        assert all(w > 0 and h > 0 for w, h in sizes), f"report plots that did not render: {sizes}"
        assert "Traceback" not in rpage.inner_text("body")
        assert not page_errors, page_errors
