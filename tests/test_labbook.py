"""The lab book (expert_lab.labbook, nbs/06i_labbook.ipynb): runs/index.html is refreshed by reading only the folders
that changed, shows damaged folders as rows, and stays whole when several processes refresh it at once.
(The page in a real browser is tests/test_labbook_browser.py's.)"""
import datetime as dt, html, json, os, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import HANG_S
from expert_lab import labbook
from expert_lab.labbook import RUN_HEAD, write_index

REPO = Path(__file__).resolve().parents[1]


# --- sample runs: the record files a run leaves, in the shapes a real tiny digits run writes them, without training
# (the same as nbs/06i_labbook.ipynb's; benchmarks/index_scale.py and tests/test_labbook_browser.py use these)

_HISTORY_HEAD = "epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds,images_per_sec\n"

def _sample_config(model, partition, n_experts, expert, epochs, seed, sweep, distill_from):
    cfg = dict(model=model, dataset="digits", expert_id=expert, n_experts=n_experts, partition=partition, epochs=epochs,
               batch_size=32, lr=0.1, seed=seed, device="cpu", distill_from=distill_from)
    return {"config": cfg, "sources": {k: "cli" for k in cfg}, **({"sweep": sweep, "point": {"seed": seed}} if sweep else {})}

def _sample_metrics(model, partition, n_experts, expert, started, status, test_acc, epochs, error):
    done = status in ("completed", "pruned")
    return dict(status=status, model=model, partition=partition, n_experts=n_experts, expert_id=expert, dataset="digits",
                started=started, attempts=1, attempt_started=started, prior_duration_s=0.0,
                provenance=dict(git_commit="0"*40, host="vm", device="x86_64", torch="2.14.1", python="3.11.7"),
                stop_reason="epochs_done" if done else "error", epochs_done=epochs if done else 0, best_epoch=epochs if done else None,
                best_val_acc=None if test_acc is None or not done else min(1.0, test_acc + 0.01), test_acc=test_acc if done else None,
                test_top5=None if test_acc is None or not done else min(1.0, test_acc + 0.3), error=error, finished=started, duration_s=12.3)


def write_sample_run(root:str|Path, # the runs folder
                     model:str="wideresnet10_1", # model name (a folder level)
                     partition:str="iid", # partition kind
                     n_experts:int=2, # experts in the group
                     expert:int=0, # this expert
                     stamp:str="20260101-000000-0000", # the run folder's name: <YYYYmmdd-HHMMSS>-<id>
                     status:str="completed", # completed, failed, pruned, interrupted...
                     test_acc:float|None=0.5, # test top-1 (None: not measured)
                     seed:int=0, # the config's seed
                     sweep:str|None=None, # sweep id (None: not part of a sweep)
                     epochs:int=3, # epochs done and planned
                     error:str|None=None, # a failed run's error line
                     distill_from:str="", # a student's teachers, <model>/<partition>-<n>
                    )->Path:
    "Write the record files of one run as `expert-lab train` does, without training; return its folder."
    group = f"distill-{distill_from.split('/', 1)[1]}" if distill_from else f"{partition}-{n_experts}"
    d = Path(root)/model/group/f"expert-{expert}"/stamp
    (d/"checkpoints").mkdir(parents=True, exist_ok=True)
    started = dt.datetime.strptime(stamp[:15], "%Y%m%d-%H%M%S").isoformat()
    (d/"config.json").write_text(json.dumps(_sample_config(model, partition, n_experts, expert, epochs, seed, sweep, distill_from), indent=2))
    (d/"metrics.json").write_text(json.dumps(_sample_metrics(model, partition, n_experts, expert, started, status, test_acc, epochs, error), indent=2))
    if status in ("completed", "pruned"):
        (d/"history.csv").write_text(_HISTORY_HEAD + "".join(f"{e},2.3,0.1,2.3,{test_acc or 0:.4f},0.1,3.1,{40 + e:.1f}\n" for e in range(1, epochs + 1)))
        (d/"checkpoints"/"last.pt").write_bytes(b"\0"*16)
    (d/"report.html").write_text(f"<!doctype html><title>{model} expert {expert}</title><h1>Training report</h1><p>{status}</p>")
    return d


def table_rows(page: str, table_id: str) -> list[list]:
    "The rows a table of the page embeds (its DataTables `data_json`)."
    at = page.index(f'querySelectorAll("#{table_id}:not(.dataTable)")')
    at = page.index('"data_json": ', at) + len('"data_json": ')
    return json.loads(json.JSONDecoder().raw_decode(page, at)[0])


def runs_by_label(root: Path) -> dict:
    "The runs table of root/index.html as {run label: {column: cell}} (the label without its link)."
    import re
    rows = table_rows((root/"index.html").read_text(), "runs")
    return {re.sub(r"<[^>]+>", "", r[0]): dict(zip(RUN_HEAD, r)) for r in rows}


def stamp(i: int) -> str: return f"20260101-10{i // 60:02d}{i % 60:02d}-{i:04x}"


@pytest.fixture
def counted(monkeypatch):
    "The run folders `labbook.read_folder` reads, in order."
    read, real = [], labbook.read_folder
    monkeypatch.setattr(labbook, "read_folder", lambda d: read.append(str(d)) or real(d))
    return read


def test_a_new_run_is_the_only_folder_read(tmp_path, counted):
    for i in range(6): write_sample_run(tmp_path, expert=i % 2, seed=i // 2, stamp=stamp(i), test_acc=0.5 + i/100)
    write_index(tmp_path)
    test_first = list(counted)
    assert len(test_first) == 6
    counted.clear()
    new = write_sample_run(tmp_path, model="resnet18", expert=1, stamp=stamp(7), test_acc=0.77)
    write_index(tmp_path)
    assert counted == [str(new)]
    rows = runs_by_label(tmp_path)
    assert len(rows) == 7 and rows[f"resnet18/iid-2/expert-1/{stamp(7)}"]["test top-1 %"] == 77.0
    counted.clear(); write_index(tmp_path)
    assert counted == []  # nothing changed: nothing read


def test_a_changed_record_is_read_again_and_shown(tmp_path, counted):
    runs = [write_sample_run(tmp_path, expert=i, stamp=stamp(i), test_acc=0.5) for i in range(2)]
    write_index(tmp_path); counted.clear()
    rec = json.loads((runs[1]/"metrics.json").read_text()); rec["test_acc"] = 0.625
    (runs[1]/"metrics.json").write_text(json.dumps(rec))
    write_index(tmp_path)
    assert counted == [str(runs[1])]
    assert runs_by_label(tmp_path)[f"wideresnet10_1/iid-2/expert-1/{stamp(1)}"]["test top-1 %"] == 62.5


def test_a_live_run_is_read_every_time(tmp_path, counted):
    d = write_sample_run(tmp_path, stamp=stamp(0), status="running", test_acc=None)
    write_index(tmp_path); write_index(tmp_path)
    assert counted == [str(d), str(d)]  # a dead holder changes no file: the status comes from the lock each time
    assert runs_by_label(tmp_path)[f"wideresnet10_1/iid-2/expert-0/{stamp(0)}"]["status"].endswith("interrupted")


DAMAGE = {  # what is written into a run folder -> what its row's reason starts with
    "metrics.json cut short": ("metrics.json", b'{"status": "completed", "test_acc": 0.', "metrics.json:"),
    "metrics.json not UTF-8": ("metrics.json", b"\xff\xfe\x00garbage", "metrics.json: cannot be read"),
    "metrics.json a list": ("metrics.json", b"[1, 2]", "metrics.json: not a JSON object"),
    "metrics.json unknown status": ("metrics.json", b'{"status": "exploded"}', "metrics.json: status 'exploded'"),
    "config.json garbled": ("config.json", b"{{{", "config.json:"),
    "config.json missing": ("config.json", None, "config.json is missing"),
    "history.csv ragged": ("history.csv", b"epoch,val_acc\n1,0.5\n2\n", "history.csv: row 3"),
}


def test_damaged_folders_are_rows_that_say_why(tmp_path):
    good = write_sample_run(tmp_path, stamp=stamp(0), test_acc=0.5)
    for i, (name, data, _) in enumerate(DAMAGE.values(), 1):
        d = write_sample_run(tmp_path, expert=1, stamp=stamp(i))
        if data is None: (d/name).unlink()
        else: (d/name).write_bytes(data)
    (tmp_path/"wideresnet10_1/iid-2/expert-1/empty-folder").mkdir()
    write_index(tmp_path)
    page = (tmp_path/"index.html").read_text()
    assert page.rstrip().endswith("</html>")
    rows = runs_by_label(tmp_path)
    assert len(rows) == len(DAMAGE) + 2
    assert rows[f"wideresnet10_1/iid-2/expert-0/{stamp(0)}"]["status"] == "completed"
    for i, (case, (_, _, why)) in enumerate(DAMAGE.items(), 1):
        row = rows[f"wideresnet10_1/iid-2/expert-1/{stamp(i)}"]
        assert 'class="st-damaged"' in row["status"], (case, row)
        assert html.unescape(row["note"]).startswith(why), (case, row["note"])
    assert rows["wideresnet10_1/iid-2/expert-1/empty-folder"]["note"] == "metrics.json is missing"
    groups = table_rows(page, "groups")  # damaged folders are in no group: one group, one completed run
    assert [(g[0], g[6]) for g in groups] == [("wideresnet10_1", 1)]


def test_failed_and_pruned_runs_show_their_status(tmp_path):
    write_sample_run(tmp_path, stamp=stamp(0), status="failed", error="RuntimeError: CUDA out of memory <gpu 0>")
    write_sample_run(tmp_path, stamp=stamp(1), status="pruned", test_acc=0.1)
    write_index(tmp_path)
    rows = list(runs_by_label(tmp_path).values())
    by = {r["note"] or "": r for r in rows}
    failed = by["RuntimeError: CUDA out of memory &lt;gpu 0&gt;"]
    assert failed["status"] == '<span class="st-failed" title="RuntimeError: CUDA out of memory &lt;gpu 0&gt;">failed</span>'
    assert by[""]["status"] == "pruned"


def test_a_damaged_cache_is_a_cold_build(tmp_path, counted):
    write_sample_run(tmp_path, stamp=stamp(0))
    write_index(tmp_path)
    (tmp_path/labbook.CACHE).write_bytes(b"\0\0 not a cache")
    counted.clear(); write_index(tmp_path)
    assert len(counted) == 1 and runs_by_label(tmp_path)


WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[3])))
from test_labbook import write_sample_run
from expert_lab.labbook import write_index
root, k = Path(sys.argv[1]), int(sys.argv[2])
(root/f"ready-{k}").touch()  # started, imported, and waiting for the others
while not (root/"go").exists(): time.sleep(0.01)
write_sample_run(root, model="resnet18", expert=k, n_experts=8, stamp=f"20260102-0000{k:02d}-{k:04x}", test_acc=0.5 + k/100)
write_index(root)
"""


def test_concurrent_writers_leave_a_whole_page_with_every_run(tmp_path):
    for i in range(20): write_sample_run(tmp_path, expert=i % 2, stamp=stamp(i))
    write_index(tmp_path)
    n = 6
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(k), str(REPO/"tests")], cwd=REPO) for k in range(n)]
    deadline = time.monotonic() + HANG_S  # a hang guard: the writers are waited for, not timed
    while len(list(tmp_path.glob("ready-*"))) < n:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a writer died before it was ready"
        time.sleep(0.01)
    (tmp_path/"go").touch()  # all start their write at once
    assert [p.wait(timeout=HANG_S) for p in procs] == [0]*n
    rows = runs_by_label(tmp_path)
    assert len(rows) == 20 + n
    assert {f"resnet18/iid-8/expert-{k}/20260102-0000{k:02d}-{k:04x}" for k in range(n)} <= set(rows)
    page = (tmp_path/"index.html").read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    assert not list(tmp_path.glob(".*.tmp")) and not list(tmp_path.glob("*.tmp"))
    builds = int((tmp_path/labbook.BUILDS).read_text())
    assert 2 <= builds <= 1 + n  # callers that found a newer build than their change skipped theirs


def test_reports_and_group_links(tmp_path):
    for k in range(2): write_sample_run(tmp_path, expert=k, stamp=stamp(k), test_acc=0.6)
    rep = tmp_path/"reports"/"20260105-120000-ensemble-ab12"; rep.mkdir(parents=True)
    params = {"model": "wideresnet10_1", "partition": "iid", "n_experts": 0, "runs_dir": str(tmp_path)}
    (rep/"report.ipynb").write_text(json.dumps({"cells": [], "metadata": {"papermill": {"parameters": params}}}))
    (rep/"report.html").write_text("<h1>ensemble</h1>")
    cmp = tmp_path/"reports"/"20260106-120000-compare_runs-cd34"; cmp.mkdir()
    (cmp/"report.html").write_text("<h1>compare</h1>")
    (tmp_path/"studies"/"lr-search").mkdir(parents=True)  # a study without its report yet: no row
    write_index(tmp_path)
    assert [r[0] for r in table_rows((tmp_path/"index.html").read_text(), "reports")] == ["compare", "ensemble"]  # newest first
    (tmp_path/"studies"/"lr-search"/"report.html").write_text("<h1>study</h1>")
    os.utime(tmp_path/"studies"/"lr-search"/"report.html", (1e9, 2e9))  # 2033: the newest
    write_index(tmp_path)
    page = (tmp_path/"index.html").read_text()
    reports = table_rows(page, "reports")
    assert [r[0] for r in reports] == ["study", "compare", "ensemble"]
    assert 'href="studies/lr-search/report.html"' in reports[0][3]
    (group,) = table_rows(page, "groups")
    assert 'href="reports/20260105-120000-ensemble-ab12/report.html"' in group[-1]
    assert group[4] == "2/2"


def test_odd_values_in_sound_files_never_break_the_page(tmp_path):
    "Hand-edited records that are valid JSON but hold odd types: the page is still written, every folder a row."
    a = write_sample_run(tmp_path, stamp=stamp(0))
    cfg = json.loads((a/"config.json").read_text()); cfg["config"].update(seed=[1, 2], epochs="many", distill_from=7)
    cfg.update(sweep=["x"], point={"lr": [0.1], "seed": {"a": 1}})
    (a/"config.json").write_text(json.dumps(cfg))
    b = write_sample_run(tmp_path, expert=1, stamp=stamp(1))
    rec = json.loads((b/"metrics.json").read_text()); rec.update(model=5, expert_id=["</script>"], started=12, provenance="x")
    (b/"metrics.json").write_text(json.dumps(rec))
    write_index(tmp_path)
    page = (tmp_path/"index.html").read_text()
    assert page.rstrip().endswith("</html>") and "</script>\"" not in page
    assert len(runs_by_label(tmp_path)) == 2 and len(table_rows(page, "groups")) == 2
