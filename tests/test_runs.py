"""End to end: train experts through `expert-lab` (papermill underneath) on a small generated CIFAR-100, then list, compare,
combine and resume them; a failing run; and the training notebook under plain papermill.

Everything is written under pytest's tmp folder: settings, runs and data are pointed there through EXPERT_LAB_SETTINGS,
EXPERT_LAB_RUNS_DIR and EXPERT_LAB_DATA_ROOT (and --runs-dir/--data-root where a command takes them), so the repo's runs/
is never touched. Each run is one epoch of two steps of a tiny wide ResNet on the CPU: seconds of training, the rest is
the kernel starting and the report being drawn."""
import csv, json, os, re, subprocess, sys
from pathlib import Path

import nbformat
import pytest

from conftest import isolated_env as clean_env, run_cli as cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
N_TEST, N_CLASSES = 200, 100
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds", "images_per_sec"]
METRICS_KEYS = {"status", "model", "partition", "n_experts", "expert_id", "dataset", "started", "finished", "duration_s",
                "attempts", "provenance", "stop_reason", "epochs_done", "best_epoch", "best_val_acc", "best_weights",
                "test_loss", "test_acc", "test_top5", "per_class_acc", "confusion", "resumed_from_epoch", "error"}
pytestmark = pytest.mark.slow


def train_args(tmp:Path, *extra, data:Path|None=None)->list:
    "Two experts, one epoch of two steps each, runs under `tmp`; `data` defaults to tmp/data."
    return ["train", "--model", "wideresnet10_1", "--dataset", "cifar100", "--data-root", data or tmp/"data", "--n-experts", "2",
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "32", "--runs-dir", tmp/"runs", *extra]


def run_dirs(root:Path)->list:
    "Every run folder under a runs folder, by expert."
    return sorted(p.parent for p in root.glob("*/*/expert-*/*/config.json"))


def errors_line(stderr:str)->list:
    return [l for l in stderr.splitlines() if l.startswith("expert-lab: ")]


def notebook_text(path:Path, sources:bool=True)->str:
    "Every cell's source (unless `sources` is False) and text output of an executed notebook, to search in."
    nb = nbformat.read(path, as_version=4)
    parts = []
    for c in nb.cells:
        if sources: parts.append(c.source)
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream": parts.append(o.get("text", ""))
            elif o.get("output_type") == "error": parts.append(f"{o.ename}: {o.evalue}")
            else: parts += [o.get("data", {}).get(k, "") for k in ("text/plain", "text/markdown", "text/html")]
    return "\n".join(parts)


def notebook_errors(path:Path)->list:
    nb = nbformat.read(path, as_version=4)
    return [f"{o.ename}: {o.evalue}" for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A small CIFAR-100 in CIFAR's own file format, and two experts trained on it at once by `expert-lab train --parallel 2`."
    from expert_lab.data import write_cifar_files
    tmp = tmp_path_factory.mktemp("lab")
    write_cifar_files(tmp/"data", n_train=600, n_test=N_TEST, num_classes=N_CLASSES, seed=0)
    r = cli(tmp, *train_args(tmp, "--parallel", "2"))  # two kernels side by side must not collide
    return tmp, r


def check_report_html(html:Path):
    text = html.read_text()
    assert re.search(r'<img [^>]*src="data:image/png;base64,', text), "plots must be embedded images"
    assert not re.search(r'<script[^>]+src="https?:', text), "the report must not load scripts from the network"
    assert "application/vnd.jupyter.widget" not in text, "no widgets in a static report"
    assert html.stat().st_size < 3_000_000, f"{html} is {html.stat().st_size} bytes"


# (a) two experts through the command line ---------------------------------------------------------------------------

def test_train_two_experts_writes_every_file(lab):
    tmp, r = lab
    assert r.returncode == 0, r.stderr[-3000:]
    runs = run_dirs(tmp/"runs")
    assert [p.parent.name for p in runs] == ["expert-0", "expert-1"]
    for k, d in enumerate(runs):
        assert d.relative_to(tmp/"runs").parts[:3] == ("wideresnet10_1", "iid-2", f"expert-{k}")
        assert re.search(rf"expert {k}: test accuracy [01]\.\d{{4}} \(top-5 [01]\.\d{{4}}\)  report {re.escape(str(d/'report.html'))}", r.stdout), r.stdout
        for f in ("report.ipynb", "report.html", "config.json", "metrics.json", "history.csv", "partition.json",
                  "checkpoints/last.pt", "checkpoints/best.pt"):
            assert (d/f).is_file(), f"{d/f} missing"
        assert notebook_errors(d/"report.ipynb") == []
        check_report_html(d/"report.html")

        cfg = json.loads((d/"config.json").read_text())
        assert set(cfg) == {"config", "sources"}
        assert cfg["config"]["expert_id"] == k and cfg["config"]["epochs"] == 1 and cfg["config"]["model"] == "wideresnet10_1"
        assert cfg["config"]["data_root"] == str(tmp/"data") and cfg["config"]["runs_dir"] == str(tmp/"runs")
        assert {cfg["sources"][x] for x in ("model", "dataset", "epochs", "batch_size", "n_experts", "data_root")} == {"arg"}
        assert cfg["sources"]["device"] == "env" and cfg["sources"]["lr"] == "default"

        m = json.loads((d/"metrics.json").read_text())
        assert METRICS_KEYS <= set(m), METRICS_KEYS - set(m)
        assert (m["status"], m["stop_reason"], m["epochs_done"], m["expert_id"], m["error"]) == ("completed", "epochs_done", 1, k, None)
        assert 0 <= m["test_acc"] <= m["test_top5"] <= 1 and 0 <= m["best_val_acc"] <= 1
        assert len(m["per_class_acc"]) == N_CLASSES and len(m["confusion"]) == N_CLASSES
        assert sum(map(sum, m["confusion"])) == N_TEST
        assert sum(m["confusion"][i][i] for i in range(N_CLASSES)) == round(m["test_acc"]*N_TEST)
        assert {"git_commit", "torch", "python", "host", "device"} <= set(m["provenance"])

        with open(d/"history.csv") as f: hist = list(csv.DictReader(f))
        assert list(hist[0]) == HISTORY_COLUMNS and [h["epoch"] for h in hist] == ["1"]

        from expert_lab.checkpoint import load_checkpoint
        for name in ("last.pt", "best.pt"):
            ck = load_checkpoint(d/"checkpoints"/name)
            assert ck["epoch"] == 1 and ck["config"]["expert_id"] == k and "model" in ck

    # the command ended by refreshing the lab book: both runs are rows of runs/index.html, linked to their reports
    page = (tmp/"runs"/"index.html").read_text()
    for d in runs: assert f'{d.relative_to(tmp/"runs").as_posix()}/report.html' in page

    parts = [json.loads((d/"partition.json").read_text()) for d in runs]
    assert parts[0]["val_idx"] == parts[1]["val_idx"], "every expert validates on the same images"
    for p in parts: assert not set(p["train_idx"]) & set(p["val_idx"])
    assert not set(parts[0]["train_idx"]) & set(parts[1]["train_idx"]), "iid experts get disjoint shards"
    assert len(parts[0]["train_idx"]) + len(parts[1]["train_idx"]) + len(parts[0]["val_idx"]) == 600


def test_group_summary_is_written(lab):
    tmp, r = lab
    summaries = list((tmp/"runs"/"wideresnet10_1"/"iid-2").glob("summary-*.csv"))
    assert len(summaries) == 1
    with open(summaries[0]) as f: rows = list(csv.DictReader(f))
    assert [(row["expert"], row["status"]) for row in rows] == [("0", "completed"), ("1", "completed")]


def test_report_reads_top_to_bottom(lab):
    "The report has each part, in order, and each figure drew."
    tmp, _ = lab
    d = run_dirs(tmp/"runs")[0]
    text = notebook_text(d/"report.ipynb")
    parts = ["# Train one expert", "## Configuration", "run folder:", "git_commit", "## This expert's data",
             "training images", "## What the network sees", "## Training", "status: completed", "## Learning curves",
             "## Final test metrics", "test_acc", "most frequent mistakes"]
    at = [text.find(p) for p in parts]
    assert all(i >= 0 for i in at), [p for p, i in zip(parts, at) if i < 0]
    assert at == sorted(at), "the report's parts are out of order"
    nb = nbformat.read(d/"report.ipynb", as_version=4)
    pngs = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert pngs >= 5, f"expected the partition heatmap, augmented batch, curves, schedule and per-class plots; got {pngs}"


# (d) runs, compare, ensemble ------------------------------------------------------------------------------------------

def test_runs_lists_with_filters(lab):
    tmp, _ = lab
    def listed(*args):
        r = cli(tmp, "runs", *args)
        assert r.returncode == 0, r.stderr
        return [l for l in r.stdout.splitlines()[1:] if l.strip()], r.stdout
    rows, out = listed()
    assert len(rows) == 2 and out.startswith("model") and all("completed" in l and str(tmp/"runs") in l for l in rows)
    assert len(listed("--model", "wideresnet10_1", "--partition", "iid")[0]) == 2
    assert len(listed("--partition", "iid-2", "--status", "completed")[0]) == 2
    assert listed("--model", "resnet18")[1].strip() == "no runs found"
    assert listed("--status", "failed")[1].strip() == "no runs found"


def test_compare_report(lab):
    tmp, _ = lab
    r = cli(tmp, "compare", "--model", "wideresnet10_1")
    assert r.returncode == 0, r.stderr[-3000:]
    html = Path(r.stdout.strip().splitlines()[-1])
    assert html.is_file() and html.parent.parent == tmp/"runs"/"reports", html
    assert notebook_errors(html.with_suffix(".ipynb")) == []
    check_report_html(html)
    text = notebook_text(html.with_suffix(".ipynb"))
    assert "2 runs (filters: model=wideresnet10_1)" in text
    for d in run_dirs(tmp/"runs"): assert "/".join(d.parts[-4:]) in text


def test_ensemble_report(lab):
    tmp, _ = lab
    r = cli(tmp, "ensemble", "--model", "wideresnet10_1", "--partition", "iid")
    assert r.returncode == 0, r.stderr[-3000:]
    html = Path(r.stdout.strip().splitlines()[-1])
    assert html.is_file() and html.parent.parent == tmp/"runs"/"reports"
    nb = html.with_suffix(".ipynb")
    assert notebook_errors(nb) == []
    check_report_html(html)
    text = notebook_text(nb)
    assert "2 of 2 experts have a completed run" in text
    # ... and `ensemble` refreshed the lab book: its report is listed there, by its path under runs/
    assert html.relative_to(tmp/"runs").as_posix() in (tmp/"runs"/"index.html").read_text()
    m = re.search(r"ensemble of 2 experts: best single expert ([\d.]+), mean ([\d.]+), routed ([\d.]+)", text)
    assert m, text[-2000:]
    assert all(0 <= float(v) <= 1 for v in m.groups())
    # the ensemble loaded the weights each run was tested with: its own test accuracy matches the recorded one
    from expert_lab.ensemble import experts_probs, accuracy
    dirs = run_dirs(tmp/"runs")
    probs, ds = experts_probs(dirs)
    for d, p in zip(dirs, probs):
        recorded = json.loads((d/"metrics.json").read_text())["test_acc"]
        assert abs(accuracy(p, ds.test_y) - recorded) <= 2/N_TEST, (d, accuracy(p, ds.test_y), recorded)


def test_ensemble_without_runs_says_so(lab):
    "Runs of other models are there, none of this one: the command says so in one line and starts no kernel."
    tmp, _ = lab
    before = sorted((tmp/"runs").rglob("*"))
    r = cli(tmp, "ensemble", "--model", "resnet18", "--partition", "iid")
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("\n") == 1 and "no completed runs of model 'resnet18'" in r.stderr
    assert sorted((tmp/"runs").rglob("*")) == before


# (f) the seed's spellings, then resume -------------------------------------------------------------------------------

def test_seed_spellings_train_then_resume(lab):
    "--expert_id, --batch_size, --no_wandb and MODEL_TYPE/EPOCHS train one expert; after raising epochs, resume continues it."
    data = lab[0]/"data"
    tmp = lab[0]/"resume"; tmp.mkdir()
    env = clean_env(tmp, MODEL_TYPE="wideresnet10_1", EPOCHS="1", EXPERT_LAB_DATA_ROOT=str(data))
    r = cli(tmp, "train", "--dataset", "cifar100", "--n_experts", "2", "--expert_id", "1", "--batch_size", "32",
            "--steps_per_epoch", "2", "--no_wandb", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    [d] = run_dirs(tmp/"runs")
    assert d.relative_to(tmp/"runs").parts[:3] == ("wideresnet10_1", "iid-2", "expert-1")
    cfg = json.loads((d/"config.json").read_text())
    want = dict(model=("wideresnet10_1", "env"), epochs=(1, "env"), expert_id=(1, "arg"), batch_size=(32, "arg"),
                wandb=(False, "arg"), steps_per_epoch=(2, "arg"))
    assert {k: (cfg["config"][k], cfg["sources"][k]) for k in want} == want

    # an interrupted run: its last.pt is at epoch 1 of what is now 2 epochs
    cfg["config"]["epochs"] = 2
    (d/"config.json").write_text(json.dumps(cfg))
    r = cli(tmp, "resume", d, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "expert 1: test accuracy" in r.stdout.splitlines()[-1]
    assert run_dirs(tmp/"runs") == [d], "resume continues in the run's own folder"
    m = json.loads((d/"metrics.json").read_text())
    assert (m["status"], m["epochs_done"], m["resumed_from_epoch"], m["attempts"], m["restarts"]) == ("completed", 2, 1, 2, 1)
    with open(d/"history.csv") as f: assert [h["epoch"] for h in csv.DictReader(f)] == ["1", "2"]
    assert (d/"previous"/"report-1.ipynb").is_file() and (d/"previous"/"report-1.html").is_file()
    text = notebook_text(d/"report.ipynb")
    assert "resumed from epoch 1" in text and "after 2 epochs" in text
    assert notebook_errors(d/"report.ipynb") == []
    check_report_html(d/"report.html")


# (b) runs that fail --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how, args, why", [
    ("nan", ("--lr", "1e20", "--grad-clip", "0", "--restart-period", "1"), "non-finite loss"),
])
def test_failed_run_keeps_its_report(lab, how, args, why):
    tmp = lab[0]/f"fail-{how.split()[0]}"; tmp.mkdir()
    r = cli(tmp, *train_args(tmp, "--expert-id", "0", *args, data=lab[0]/"data"))
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    line = r.stdout.splitlines()[-1]
    assert line.startswith("expert 0: failed: ") and why in line, line
    [d] = run_dirs(tmp/"runs")
    assert str(d) in line, "the failure line says where the report is"
    m = json.loads((d/"metrics.json").read_text())
    assert m["status"] == "failed" and why in m["error"]
    assert (d/"report.ipynb").is_file() and (d/"report.html").is_file()
    assert why in notebook_text(d/"report.ipynb")
    check_report_html(d/"report.html")
    assert "failed" in cli(tmp, "runs", "--status", "failed").stdout


# (e) plain papermill -------------------------------------------------------------------------------------------------

def test_plain_papermill_fills_a_run_folder(lab):
    data = lab[0]/"data"
    tmp = lab[0]/"papermill"; tmp.mkdir()
    params = dict(model="wideresnet10_1", expert_id=0, dataset="cifar100", data_root=str(data), epochs=1, batch_size=32,
                  steps_per_epoch=2, runs_dir=str(tmp/"runs"))
    cmd = [str(BIN/"papermill"), str(REPO/"nbs"/"train_expert.ipynb"), str(tmp/"out.ipynb"), "--cwd", str(tmp)]
    for k, v in params.items(): cmd += ["-p", k, str(v)]
    r = subprocess.run(cmd, cwd=tmp, env=clean_env(tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert notebook_errors(tmp/"out.ipynb") == []
    [d] = run_dirs(tmp/"runs")
    # n_experts was not passed: it comes from the same layers as for `expert-lab train` (here the built-in 4)
    assert d.relative_to(tmp/"runs").parts[:3] == ("wideresnet10_1", "iid-4", "expert-0")
    for f in ("config.json", "metrics.json", "history.csv", "partition.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (d/f).is_file(), f
    cfg = json.loads((d/"config.json").read_text())
    assert {k: cfg["sources"][k] for k in params} == dict.fromkeys(params, "arg")
    assert cfg["config"]["batch_size"] == 32 and cfg["config"]["data_root"] == str(data)
    m = json.loads((d/"metrics.json").read_text())
    assert m["status"] == "completed" and m["epochs_done"] == 1 and METRICS_KEYS - {"run_dir"} <= set(m)


# --run-dir: what a plain sbatch script uses to resume a requeued task in the same folder ----------------------------

def test_run_dir_is_reused_and_resumed(lab):
    tmp, data = lab[0]/"named", lab[0]/"data"
    run = tmp/"runs"/"task-7"
    args = lambda epochs: ["train", "--model", "wideresnet10_1", "--dataset", "cifar100", "--data-root", data, "--n-experts", "2",
                           "--expert-id", "1", "--epochs", epochs, "--steps-per-epoch", "2", "--batch-size", "32",
                           "--runs-dir", tmp/"runs", "--run-dir", run]
    r = cli(tmp, *args(1)); assert r.returncode == 0, r.stderr[-3000:]
    r = cli(tmp, *args(2)); assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run/"metrics.json").read_text())
    assert (m["status"], m["epochs_done"], m["resumed_from_epoch"], m["attempts"]) == ("completed", 2, 1, 2)
    with open(run/"history.csv") as f: assert [h["epoch"] for h in csv.DictReader(f)] == ["1", "2"]
    assert (run/"previous"/"report-1.ipynb").is_file() and (run/"report.html").is_file()
    from expert_lab.labbook import BUILDS, CACHE, INDEX, LOCK  # the lab book's page and its bookkeeping
    assert sorted(p.name for p in (tmp/"runs").iterdir() if p.name not in {INDEX, CACHE, LOCK, BUILDS}) == ["task-7"], \
        "no other run folder was made"
