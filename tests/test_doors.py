"""The two doors into a run, end to end: `expert-lab train` and plain `papermill nbs/train_expert.ipynb` resolve the same
config; the terminal shows a few lines; Ctrl-C, SIGTERM and SIGKILL leave a run folder that says what happened and
resumes exactly; history.csv is whole while a resumed attempt runs.

Every run is a tiny wide ResNet on the bundled digits images, a few steps per epoch, on the CPU."""
import csv, json, os, re, signal, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest

from conftest import BIN, HANG_S, REPO

pytestmark = pytest.mark.slow
MARKERS = ("Executing Cell", "Ending Cell", "<Figure size", "Executing:", "Input Notebook")


def train_args(tmp, *extra, epochs=3, expert="0"):
    return ["train", "--model", "wideresnet10_1", "--dataset", "digits", "--n-experts", "2", "--expert-id", expert,
            "--epochs", str(epochs), "--restart-period", str(epochs), "--steps-per-epoch", "2", "--batch-size", "32",
            "--deterministic", "--runs-dir", str(tmp/"runs"), *map(str, extra)]


def run_dirs(root):
    return sorted(p.parent for p in Path(root).glob("*/*/expert-*/*/config.json"))


def metrics(d): return json.loads((Path(d)/"metrics.json").read_text())
def history_epochs(d):
    with open(Path(d)/"history.csv") as f: return [int(r["epoch"]) for r in csv.DictReader(f)]


class Live:
    "A command whose output lines the test reads as they come, to act at a moment the run itself reaches."
    def __init__(self, cmd, env):
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)  # its own process group, as a terminal's job is
        self.lines = []

    def until(self, pred):
        "Read lines until `pred(lines)` holds; fail if the command ends first."
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))
            if pred(self.lines): return self.lines
        raise AssertionError("the command ended before the moment came:\n" + "\n".join(self.lines[-30:]))

    def finish(self, timeout=600):
        out, _ = self.p.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return self.p.returncode


def has(text): return lambda lines: any(text in l for l in lines)


def kernel_of(parent_pid):
    "The pid of the Jupyter kernel a process started (it carries JPY_PARENT_PID), or None."
    for p in Path("/proc").iterdir():
        if not p.name.isdigit(): continue
        try: env = (p/"environ").read_bytes()
        except OSError: continue
        if f"JPY_PARENT_PID={parent_pid}".encode() in env.split(b"\0"): return int(p.name)
    return None


def wait_gone(pid, timeout=HANG_S):
    "Wait until process `pid` has exited (a condition the test observes; it is not a guess about timing)."
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try: os.kill(pid, 0)
        except ProcessLookupError: return
        time.sleep(0.1)
    raise AssertionError(f"process {pid} still runs")


# one request, two doors --------------------------------------------------------------------------------------------

def test_same_config_through_both_doors(tmp_path, clean_env, cli):
    (tmp_path/"settings.ini").write_text("[training]\nn_experts = 3\npartition = classes\n")
    env = clean_env(tmp_path, EXPERT_LAB_LR="0.07", EPOCHS="1", EXPERT_LAB_RESTART_PERIOD="1")
    r = cli(tmp_path, "train", "--model", "wideresnet10_1", "--dataset", "digits", "--expert-id", "1", "--steps-per-epoch", "2",
            "--batch-size", "32", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    p = subprocess.run([str(BIN/"papermill"), str(REPO/"nbs"/"train_expert.ipynb"), str(tmp_path/"out.ipynb"),
                        "-p", "model", "wideresnet10_1", "-p", "dataset", "digits", "-p", "expert_id", "1",
                        "-p", "steps_per_epoch", "2", "-p", "batch_size", "32"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = run_dirs(tmp_path/"runs")
    assert a.parent == b.parent and a.parent.relative_to(tmp_path/"runs").parts == ("wideresnet10_1", "classes-3", "expert-1")
    ca, cb = (json.loads((d/"config.json").read_text()) for d in (a, b))
    assert ca["config"] == cb["config"]
    assert ca["sources"] == cb["sources"]
    assert {k: ca["sources"][k] for k in ("n_experts", "lr", "epochs", "model", "expert_id", "device")} == \
           dict(n_experts="settings", lr="env", epochs="env", model="arg", expert_id="arg", device="env")
    assert all(metrics(d)["status"] == "completed" for d in (a, b))


def test_a_few_clear_lines(tmp_path, clean_env, cli):
    r = cli(tmp_path, *train_args(tmp_path, epochs=3))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (r.stdout + r.stderr).splitlines()
    assert len(lines) <= 3 + 8, lines
    assert not any(m in l for l in lines for m in MARKERS), lines
    assert "" not in lines, "no blank lines"
    [d] = run_dirs(tmp_path/"runs")
    assert lines[0] == f"expert 0: training in {d}"
    assert [l for l in lines if l.startswith("epoch ")] == [l for l in lines if l.startswith("epoch ")][:3]
    assert sum(l.startswith("epoch ") for l in lines) == 3
    assert lines[-1].startswith("expert 0: test accuracy") and lines[-1].endswith(f"report {d/'report.html'}")
    # the report opens with the result
    nb = nbformat.read(d/"report.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "summary" in first.metadata.tags
    shown = first.outputs[0]["data"]["text/markdown"]
    assert "| status | completed (epochs_done) |" in shown and "| test accuracy |" in shown and "| epochs done | 3 |" in shown
    html = (d/"report.html").read_text()
    assert html.index("test accuracy") < html.index("Configuration")
    assert (d/"run.log").is_file()


# stopping from the terminal ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    "The 5-epoch run every stopped and resumed run must end identical to."
    tmp = tmp_path_factory.mktemp("reference")
    from conftest import run_cli
    r = run_cli(tmp, *train_args(tmp, epochs=5))
    assert r.returncode == 0, r.stdout + r.stderr
    [d] = run_dirs(tmp/"runs")
    return d


def same_result(d, ref):
    "A resumed run's result is the uninterrupted run's, to the last digit."
    a, b = metrics(d), metrics(ref)
    for k in ("epochs_done", "best_epoch", "best_val_acc", "test_acc", "test_loss", "test_top5"):
        assert a[k] == b[k], (k, a[k], b[k])
    assert history_epochs(d) == history_epochs(ref)

def test_ctrl_c_stops_two_parallel_experts_that_stream_their_lines(tmp_path, clean_env, cli):
    live = Live([str(BIN/"expert-lab"), *train_args(tmp_path, "--parallel", "2", epochs=30, expert="all")], clean_env(tmp_path))
    # both experts' epoch lines arrive while they train (30 epochs would take minutes)
    live.until(lambda ls: has("[expert 0] epoch   1/30")(ls) and has("[expert 1] epoch   1/30")(ls))
    os.killpg(live.p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    assert live.finish() == 130, "\n".join(live.lines)
    dirs = run_dirs(tmp_path/"runs")
    assert len(dirs) == 2
    for d in dirs:
        m = metrics(d)
        assert (m["status"], m["stop_reason"], m["stop_signal"]) == ("interrupted", "interrupt", "SIGINT")
        assert m["stopped_at"]["epoch"] == m["epochs_done"] + 1, "last.pt was saved at the step boundary it names"
        assert 1 <= m["epochs_done"] < 30 and (d/"checkpoints"/"last.pt").is_file() and (d/"report.html").is_file()
        assert any(l.endswith(f"resume with: expert-lab resume {d}") for l in live.lines)
    out = cli(tmp_path, "runs").stdout
    assert out.count("interrupted") == 2


def test_ctrl_c_to_one_expert_saves_and_resumes_exactly(tmp_path, clean_env, cli, reference):
    live = Live([str(BIN/"expert-lab"), *train_args(tmp_path, epochs=5)], clean_env(tmp_path))
    live.until(has("epoch   1/5"))
    os.killpg(live.p.pid, signal.SIGINT)  # a terminal's Ctrl-C, to the whole process group
    assert live.finish() == 130, "\n".join(live.lines)
    [d] = run_dirs(tmp_path/"runs")
    m = metrics(d)
    assert (m["status"], m["stop_signal"]) == ("interrupted", "SIGINT") and m["stopped_at"]["epoch"] == m["epochs_done"] + 1
    assert (d/"report.html").is_file() and "| status | interrupted" in (d/"report.ipynb").read_text()
    assert "interrupted" in cli(tmp_path, "runs").stdout
    r = cli(tmp_path, "resume", d)
    assert r.returncode == 0, r.stdout + r.stderr
    same_result(d, reference)


def test_sigterm_saves_and_the_run_resumes_exactly(tmp_path, clean_env, cli, reference):
    live = Live([str(BIN/"expert-lab"), *train_args(tmp_path, epochs=5)], clean_env(tmp_path))
    live.until(has("epoch   1/5"))
    os.kill(live.p.pid, signal.SIGTERM)  # to the process only, as `kill` does
    assert live.finish() == 143, "\n".join(live.lines)
    [d] = run_dirs(tmp_path/"runs")
    m = metrics(d)
    assert (m["status"], m["stop_signal"]) == ("interrupted", "SIGTERM") and any("SIGTERM: stopped in epoch" in l for l in live.lines)
    assert any(l.startswith("expert 0: stopped by SIGTERM in epoch") for l in live.lines)
    assert (d/"report.html").is_file() and "| status | interrupted" in (d/"report.ipynb").read_text()
    r = cli(tmp_path, "resume", d)
    assert r.returncode == 0, r.stdout + r.stderr
    a = metrics(d)
    assert (a["status"], a["attempts"], a["restarts"]) == ("completed", 2, 1)
    same_result(d, reference)


def test_sigkill_of_the_parent_then_a_resume_keeps_history_whole(tmp_path, clean_env, cli, reference):
    live = Live([str(BIN/"expert-lab"), *train_args(tmp_path, epochs=5)], clean_env(tmp_path))
    live.until(has("epoch   2/5"))
    kernel = kernel_of(live.p.pid)
    os.killpg(live.p.pid, signal.SIGKILL)
    live.finish()
    if kernel: wait_gone(kernel)  # the kernel notices its parent is gone and ends
    [d] = run_dirs(tmp_path/"runs")
    assert metrics(d)["status"] == "running", ("nobody was left to write the record", metrics(d).get("error"))  # the kernel wrote nothing after its parent died
    listed = cli(tmp_path, "runs").stdout
    assert "interrupted" in listed and str(d) in listed, listed
    # resume, and look at history.csv while the resumed attempt runs
    live = Live([str(BIN/"expert-lab"), "resume", str(d)], clean_env(tmp_path))
    live.until(has("resumed from"))
    resumed_at = int(re.search(r"after epoch (\d+)", next(l for l in live.lines if "resumed from" in l)).group(1))
    live.until(has(f"epoch {resumed_at + 2:>3}/5"))  # the resumed attempt's first epoch has been recorded
    assert history_epochs(d)[:resumed_at + 1] == list(range(1, resumed_at + 2)), "every epoch, across attempts"
    assert live.finish() == 0, "\n".join(live.lines)
    assert any("took over run folder" in l for l in live.lines)
    assert history_epochs(d) == [1, 2, 3, 4, 5] and metrics(d)["status"] == "completed"
    same_result(d, reference)


def test_a_second_writer_is_refused_before_any_work(tmp_path, clean_env, cli):
    run = tmp_path/"runs"/"mine"
    live = Live([str(BIN/"expert-lab"), *train_args(tmp_path, "--run-dir", run, epochs=30)], clean_env(tmp_path))
    live.until(has("epoch   1/30"))
    # the survivor's files (not its lock, nor a temporary an atomic write has in flight at this moment)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and not p.name.startswith(".")}
    r = cli(tmp_path, *train_args(tmp_path, "--run-dir", run, epochs=30))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "is in use by" in r.stderr, r.stderr
    assert str(live.p.pid) in r.stderr, "the holder is named"
    os.killpg(live.p.pid, signal.SIGINT)  # Ctrl-C to one expert's terminal
    assert live.finish() == 130
    m = metrics(run)
    assert (m["status"], m["stop_signal"]) == ("interrupted", "SIGINT") and set(before) <= {p for p in run.rglob("*") if p.is_file()}
    assert (run/"report.html").is_file() and (run/"checkpoints"/"last.pt").is_file()


# plain papermill ---------------------------------------------------------------------------------------------------

def test_plain_papermill_smoke_switch_and_bad_input(tmp_path, clean_env):
    env = clean_env(tmp_path)
    pm = lambda *a: subprocess.run([str(BIN/"papermill"), str(REPO/"nbs"/"train_expert.ipynb"), str(tmp_path/"out.ipynb"), *a],
                                   cwd=tmp_path, env=env, capture_output=True, text=True)
    r = pm("-p", "smoke", "True")
    assert r.returncode == 0, r.stderr[-3000:]
    [d] = run_dirs(tmp_path/"runs")
    c = json.loads((d/"config.json").read_text())
    assert (c["config"]["dataset"], c["config"]["epochs"], c["sources"]["dataset"]) == ("digits", 2, "arg")
    assert (c["config"]["device"], c["sources"]["device"]) == ("cpu", "env"), "keys the smoke run does not set keep their layers"
    r = pm("-p", "smoke", "True", "-p", "batch_size", "5000")
    assert r.returncode != 0 and "fewer than batch_size=5000" in r.stderr
    assert run_dirs(tmp_path/"runs") == [d], "a refused run makes no folder"
