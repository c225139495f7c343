"""The lab book in a real (headless) Chromium: runs/index.html opened from disk sorts, filters, searches, leads into a
run's report.html, and asks nothing of the network.

The run folders are written by `test_labbook.write_sample_run` (the record files a run leaves, no training): three models,
two experts each, one failed run and one damaged folder. Needs Debian's chromium and the `playwright` package
(bash tools/browser-setup.sh); skipped without them unless TEST_REQUIRE_BROWSER=1, as tests/test_browser.py.
Screenshots land in tests/artifacts/ (git-ignored)."""
from __future__ import annotations
import re
from pathlib import Path

import pytest

from expert_lab.labbook import write_index
from test_labbook import write_sample_run
from conftest import HANG_S
from test_browser import ARTIFACTS, CHROMIUM_ARGS, _chromium, _need_browser

pytestmark = pytest.mark.browser
MODELS = ("wideresnet10_1", "resnet18", "densenet_bc100_k12")
TEST_COL = "test top-1 %"


def _runs(root: Path):
    for i, m in enumerate(MODELS):
        for k in range(2):
            write_sample_run(root, model=m, expert=k, stamp=f"20260101-10{i}{k}00-{i}{k}a0", test_acc=0.3 + i/10 + k/20, sweep="lr-1")
    write_sample_run(root, model="resnet18", expert=1, stamp="20260102-100000-ffff", status="failed", error="RuntimeError: boom")
    bad = write_sample_run(root, model="resnet18", expert=0, stamp="20260102-110000-dead")
    (bad/"metrics.json").write_text('{"status": "completed", "test_acc": 0.')


def _column(page, name: str) -> list[str]:
    "The cells of column `name` on the runs table's current page."
    heads = page.evaluate("Array.from(document.querySelectorAll('#runs thead th'), th => th.textContent)")
    col = [re.sub(r"\s+", " ", h).strip() for h in heads].index(name)
    return page.locator(f"#runs tbody tr td:nth-child({col + 1})").all_inner_texts()


def _rows(page) -> int: return page.locator("#runs tbody tr").count()


def test_index_sorts_filters_searches_and_links_offline(tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright
    root = tmp_path/"runs"; _runs(root)
    index = write_index(root)
    ARTIFACTS.mkdir(exist_ok=True)
    outside, errors = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(HANG_S*1000)  # every wait below is for a state the page reaches; the deadline only guards a hang
        page.on("request", lambda r: None if r.url.startswith(("file://", "blob:", "data:")) else outside.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(index.as_uri())
            page.wait_for_selector("#runs.dataTable tbody tr td")
            assert _rows(page) == 8  # 6 runs, 1 failed, 1 damaged
            assert "damaged" in _column(page, "status") and "failed" in _column(page, "status")

            # sort by test accuracy: the first click sorts ascending, the second descending
            head = page.locator("div.dt-scroll:has(#runs) .dt-scroll-head th", has_text=TEST_COL)
            head.click(); head.click()
            accs = [float(a) for a in _column(page, TEST_COL) if a.strip()]
            assert accs == sorted(accs, reverse=True) and accs[0] == 55.0, accs

            # filter one model with its pane
            page.locator("#runs_wrapper button.dtsp-showAll").click()
            page.locator("#runs_wrapper .dtsp-searchPane").first.locator("span[title='densenet_bc100_k12']").click()
            page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 2")
            assert set(_column(page, "model")) == {"densenet_bc100_k12"}
            page.screenshot(path=str(ARTIFACTS/"labbook-filtered.png"), full_page=True)
            page.locator("#runs_wrapper button.dtsp-clearAll").click()
            page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 8")

            # free-text search: the failed run's error is searchable
            page.locator("#runs_wrapper .dt-search input").fill("boom")
            page.wait_for_function("document.querySelectorAll('#runs tbody tr').length === 1")
            assert _column(page, "status") == ["failed"]

            # follow the run's link into its report.html, on disk
            page.locator("#runs tbody tr td a", has_text="20260102-100000-ffff").click()
            page.wait_for_url(re.compile(r"^file://.*/resnet18/iid-2/expert-1/20260102-100000-ffff/report\.html$"))
            assert page.locator("h1").inner_text() == "Training report"
        except Exception:
            page.screenshot(path=str(ARTIFACTS/"labbook-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert outside == [], f"requests that left file://: {outside}"
    assert errors == [], errors
