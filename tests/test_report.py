"""A run's report.html reads as a document: the result first, no plumbing (parameters, lock token, console pipe, config
JSON), wiring cells shown by their output only, numbers rounded for reading, only the sections that apply, and links
back to the runs folder's index and the group's ensemble report. One tiny real run (digits, two short epochs) is shared
by every assertion; the .ipynb beside it keeps everything."""
import html as htmllib, json, re
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest

from conftest import tiny_config

pytestmark = pytest.mark.slow


def text_of(html:str)->str:
    "What a reader sees of a page: its text, without tags, styles and scripts."
    html = re.sub(r"<(style|script)\b.*?</\1>", "", html, flags=re.S)
    return htmllib.unescape(re.sub(r"<[^>]+>", " ", html))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "One completed run through `run_expert` (the door every expert-lab command takes), with an ensemble report of its group."
    from expert_lab.execute import run_expert
    root = tmp_path_factory.mktemp("report")/"runs"
    ens = root/"reports"/"20261201-120000-ensemble-ab12"; ens.mkdir(parents=True)
    meta = dict(papermill=dict(parameters=dict(model="wideresnet10_1", partition="iid", n_experts=0, runs_dir=str(root))))
    (ens/"report.ipynb").write_text(json.dumps(dict(cells=[], metadata=meta, nbformat=4, nbformat_minor=5)))
    (ens/"report.html").write_text("<html></html>")
    cfg = tiny_config(epochs=2, restart_period=2, steps_per_epoch=2, runs_dir=str(root))
    rec = run_expert(cfg, {k: "arg" if k in ("model", "dataset") else "default" for k in asdict(cfg)}, resume=False,
                     console=lambda line: None)  # a console pipe, whose path must not show
    d = Path(rec["run_dir"])
    return d, (d/"report.html").read_text(), nbformat.read(d/"report.ipynb", as_version=4), rec


def test_no_plumbing_in_the_html(run):
    d, html, nb, _ = run
    [injected] = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    token = re.search(r'lock_token = "([^"]+)"', injected.source).group(1)
    pipe = re.search(r'console = "([^"]+)"', injected.source).group(1)
    assert "config_json" in injected.source, "the .ipynb keeps everything"
    for s in [token, "lock_token", "config_json", '{"config"', '"sources"', "/tmp/expert-lab-kernel-", pipe]:
        assert s not in html, s
    text = text_of(html)
    assert "= None" not in text, "the parameters cell is not in the report"
    for wiring in ("open_notebook_run", "console_tee", "recording(", "run_hooks", "summary_markdown"):
        assert wiring not in text, wiring


def test_the_result_comes_first_and_the_config_table_stays(run):
    d, html, _, _ = run
    text = text_of(html)
    assert text.index("test accuracy") < text.index("Configuration") < text.index("'wideresnet10_1'") < text.index("Final test metrics")
    assert f"run folder: {d}" in text and re.search(r"model\s+'wideresnet10_1'\s+arg", text)


def test_numbers_are_rounded_for_reading(run):
    _, html, _, rec = run
    text = text_of(html)
    for k in ("best_val_acc", "test_acc", "test_top5"):
        assert re.search(rf"{k}\s+{100*rec[k]:.2f}%", text), k
    assert re.search(rf"test_loss\s+{rec['test_loss']:.4g}\s", text)
    assert not re.search(r"\d\.\d{6,}", text), re.findall(r"\S*\d\.\d{6,}\S*", text)


def test_only_the_sections_that_apply(run):
    text = text_of(run[1])
    assert "Student and teachers" not in text and "distilled student" not in text


def test_links_to_the_runs_index_and_the_group_ensemble(run):
    d, html, _, _ = run
    assert 'href="../../../../index.html"' in html
    assert 'href="../../../../reports/20261201-120000-ensemble-ab12/report.html"' in html


def test_a_sweep_report_hides_its_parameters(run, tmp_path):
    from expert_lab.execute import report_notebook
    html = report_notebook("sweep_report", dict(sweep_id=""), tmp_path/"runs").read_text()
    text = text_of(html)
    assert "No sweep chosen" in text and "sweep_id:" not in text and "runs_dir" not in text and "list_sweeps" not in text
