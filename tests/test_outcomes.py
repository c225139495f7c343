"""Outcomes said as they are, through both doors: a kernel killed mid-run is `interrupted` and resumes; a completed run
has nothing to resume and is left byte for byte as it was; an ensemble of an incomplete or mixed-seed group warns;
a one-class dataset and bad papermill parameters are refused in one line before any run folder exists.

Every run is a tiny wide ResNet on the bundled digits images, a few steps per epoch, on the CPU."""
import datetime as dt, json, subprocess, textwrap
from pathlib import Path

import pytest

from conftest import BIN, REPO


@pytest.fixture(autouse=True)
def settings_file(tmp_path):
    "The isolated environment names tmp/settings.ini; an empty one means the built-in defaults."
    (tmp_path/"settings.ini").touch()


def train_args(tmp, *extra, epochs=3, expert="0", seed=0):
    return ["train", "--model", "wideresnet10_1", "--dataset", "digits", "--n-experts", "2", "--expert-id", expert,
            "--epochs", str(epochs), "--restart-period", str(epochs), "--steps-per-epoch", "2", "--batch-size", "32",
            "--seed", str(seed), "--deterministic", "--runs-dir", str(tmp/"runs"), *map(str, extra)]


def run_dirs(root): return sorted(p.parent for p in Path(root).glob("*/*/expert-*/*/config.json"))
def metrics(d): return json.loads((Path(d)/"metrics.json").read_text())
def snapshot(d): return {p.relative_to(d): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


# The kernel kills itself with SIGKILL right after epoch AT is saved and recorded in history.csv: a point the run
# reaches deterministically. A sitecustomize on PYTHONPATH patches the history hook in every Python process of the
# command; only the kernel ever calls it.
DIE_AFTER_EPOCH = textwrap.dedent("""
    import os, signal
    if os.environ.get("TEST_DIE_AFTER_EPOCH"):
        from expert_lab import notebook_run
        _write = notebook_run.HistoryCSV.on_epoch_end
        def _die(self, record, state):
            _write(self, record, state)
            if state.epoch >= int(os.environ["TEST_DIE_AFTER_EPOCH"]): os.kill(os.getpid(), signal.SIGKILL)
        notebook_run.HistoryCSV.on_epoch_end = _die
""")


def shift_record(d, days):
    "Move every time stamp of the run's record `days` into the past: as if its attempt had run that long ago."
    rec = metrics(d)
    for k in ("started", "attempt_started", "finished"):
        if rec.get(k): rec[k] = (dt.datetime.fromisoformat(rec[k]) - dt.timedelta(days=days)).isoformat(timespec="seconds")
    (Path(d)/"metrics.json").write_text(json.dumps(rec))


@pytest.mark.slow
def test_a_killed_kernel_is_interrupted_resumes_and_then_has_nothing_to_train(tmp_path, clean_env, cli):
    hook = tmp_path/"hook"; hook.mkdir(); (hook/"sitecustomize.py").write_text(DIE_AFTER_EPOCH)
    r = cli(tmp_path, *train_args(tmp_path), env=clean_env(tmp_path, PYTHONPATH=str(hook), TEST_DIE_AFTER_EPOCH="1"))
    [d] = run_dirs(tmp_path/"runs")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == f"expert 0: stopped after epoch 1 (checkpoints/last.pt saved there); resume with: expert-lab resume {d}"
    m = metrics(d)
    assert (m["status"], m["stop_reason"]) == ("interrupted", "killed") and "kernel died" in m["error"], m
    assert (d/"checkpoints"/"last.pt").is_file() and (d/"report.html").is_file()
    listed = cli(tmp_path, "runs").stdout
    assert any("interrupted" in l and str(d) in l for l in listed.splitlines()), listed
    # a day passes between the attempts: it is not part of the run's duration
    first = m["duration_s"]
    shift_record(d, days=1)
    r = cli(tmp_path, "resume", d)
    assert r.returncode == 0, r.stdout + r.stderr
    m = metrics(d)
    assert (m["status"], m["epochs_done"], m["attempts"]) == ("completed", 3, 2), m
    assert "resumed from" in r.stdout and "after epoch 1" in r.stdout, r.stdout
    assert first <= m["duration_s"] < 3600, (first, m["duration_s"])
    assert (d/"previous"/"report-1.html").is_file()
    # resuming the completed run: one line, exit 0, not one byte changed
    before = snapshot(d)
    r = cli(tmp_path, "resume", d)
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    assert r.stdout.splitlines() == [f"expert 0: nothing to train: the run completed after 3 of 3 epochs (epochs_done), "
                                     f"test accuracy {m['test_acc']:.4f}; nothing was changed in {d}"]
    assert snapshot(d) == before


def test_a_one_class_folder_dataset_is_refused_before_any_work(tmp_path, cli):
    from PIL import Image
    for split in ("train", "test"):
        (tmp_path/"one"/split/"cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(tmp_path/"one"/split/"cat"/"0.png")
    r = cli(tmp_path, "train", "--model", "wideresnet10_1", "--dataset", "folder", "--data-root", tmp_path/"one",
            "--runs-dir", tmp_path/"runs", "--expert-id", "0", "--n-experts", "1")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "has one class folder (cat): a classifier needs two classes or more" in r.stderr, r.stderr
    assert not (tmp_path/"runs").exists()


# plain papermill ---------------------------------------------------------------------------------------------------

def papermill(tmp, env, *params):
    return subprocess.run([str(BIN/"papermill"), str(REPO/"nbs"/"train_expert.ipynb"), str(tmp/"out.ipynb"), *params],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("params, line", [
    (["-p", "nosuchkey", "1", "-p", "model", "wideresnet10_1", "-p", "dataset", "digits"], "ConfigError: unknown config key 'nosuchkey'"),
    (["-p", "epoch", "3", "-p", "smoke", "True"], "ConfigError: unknown config key 'epoch' (did you mean 'epochs'?)"),
    (["-p", "config_json", "{oops", "-p", "run_dir", "somewhere"], "ConfigError: config_json: not JSON of"),
    (["-p", "smoke", "True", "-p", "resume", "yes"], "ConfigError: resume: expected True or False, got 'yes' (str)"),
    (["-p", "smoke", "True", "-p", "epochs", "0"], "ConfigError: epochs: must be > 0, got 0"),
])
def test_bad_papermill_parameters_are_one_line_and_create_nothing(tmp_path, clean_env, params, line):
    r = papermill(tmp_path, clean_env(tmp_path), *params)
    assert r.returncode == 1, r.stderr[-3000:]
    assert line in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]  # the last line papermill prints is the refusal
    assert "open_notebook_run" not in r.stderr and "ipython-input" not in r.stderr, "no traceback from inside the kernel"
    assert not (tmp_path/"runs").exists() and not list(tmp_path.rglob("metrics.json"))


# ensembles that say less than they seem to --------------------------------------------------------------------------

@pytest.mark.slow
def test_an_incomplete_or_mixed_seed_ensemble_warns(tmp_path, clean_env, cli):
    r = cli(tmp_path, *train_args(tmp_path, epochs=1, expert="0", seed=0))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli(tmp_path, "ensemble", "--model", "wideresnet10_1", "--partition", "iid")
    assert r.returncode == 0, r.stdout + r.stderr
    warn = "only 1 of 2 experts have a completed run (missing: expert 1); the ensemble combines those 1"
    assert r.stderr.splitlines() == [f"expert-lab: warning: {warn}"], r.stderr
    assert warn in Path(r.stdout.strip()).read_text()  # the report says it too
    r = cli(tmp_path, *train_args(tmp_path, epochs=1, expert="1", seed=1))
    assert r.returncode == 0, r.stdout + r.stderr
    r = cli(tmp_path, "ensemble", "--model", "wideresnet10_1", "--partition", "iid")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(l.startswith("expert-lab: warning: ") for l in lines), r.stderr
    assert any("the experts have different seeds (seed 0 in" in l and "validation images are held out from all of them" in l
               for l in lines), lines
    report = Path(r.stdout.strip()).read_text()
    assert "different seeds" in report and "only 1 of 2" not in report
