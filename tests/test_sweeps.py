"""Sweeps end to end: a 2x2 grid (lr x seed) on the bundled `digits` images killed during its third run and continued by
the same command; a failing point beside a good one; the sweep report; bad input refused before anything is created;
and a small grid submitted to a real single-node Slurm as one array.

Runs go through `run_sweep`, the entry `expert-lab train` calls for a grid, in a child process started like the CLI
(the DRIVER below), so a SIGKILL takes down the whole sweep as it would on a real machine. Every run is a tiny wide
ResNet, two epochs of three steps, on the CPU."""
import configparser, csv, json, os, shutil, subprocess, sys, time
from pathlib import Path

import nbformat
import pytest

from conftest import CONFIG_ENV as _CONFIG_ENV, SLURM_FINAL as TERMINAL, isolated_env as clean_env, wait_slurm as wait_done

from expert_lab.config import ConfigError
from expert_lab.files import read_json, write_json
from expert_lab.sweeps import open_sweep, run_sweep
from expert_lab.sweep_stats import point_summary, report_keys, sweep_frame, sweep_report

REPO = Path(__file__).resolve().parents[1]

# what `expert-lab train` does with a grid: run_sweep, and a ConfigError as one line with exit status 2
DRIVER = """
import json, sys
from expert_lab.config import ConfigError
from expert_lab.sweeps import run_sweep
a = json.loads(sys.argv[1])
try: sys.exit(run_sweep(a.pop("args"), a.pop("experts"), command="test-sweep", **a))
except ConfigError as e: print(f"expert-lab: error: {e}", file=sys.stderr); sys.exit(2)
"""

# An IPython startup file for the training kernels: after the first epoch of the run lr=0.1 seed=0 (the third of the
# grid) is saved, on that run's first attempt, it SIGKILLs the sweep process (the kernel's parent) and then itself.
KILLER = """
import json, os, signal
from pathlib import Path
import expert_lab.train as _t
_train = _t.train
class _KillTheSweep:
    def __init__(self, run_dir): self.run_dir = Path(run_dir)
    def on_epoch_end(self, record, state=None):
        cfg = json.loads((self.run_dir/"config.json").read_text())["config"]
        attempts = json.loads((self.run_dir/"metrics.json").read_text()).get("attempts")
        if (cfg["lr"], cfg["seed"]) == (0.1, 0) and attempts == 1:
            Path(os.environ["SWEEP_TEST_KILLED"]).write_text(str(self.run_dir))
            os.kill(os.getppid(), signal.SIGKILL); os.kill(os.getpid(), signal.SIGKILL)
def train(cfg, *args, run_dir=None, hooks=(), **kw):
    return _train(cfg, *args, run_dir=run_dir, hooks=[*hooks, _KillTheSweep(run_dir)], **kw)
_t.train = train
"""


def grid_args(tmp:Path, **kw)->dict:
    "A 2x2 grid, lr x seed, of one tiny expert on digits; `kw` changes or adds keys."
    return dict(model="wideresnet10_1", dataset="digits", n_experts=1, epochs=2, steps_per_epoch=3, batch_size=32,
                runs_dir=str(tmp/"runs"), lr="0.05,0.1", seed="0,1") | kw


def sweep(tmp:Path, args:dict, experts="0", env:dict|None=None, **kw)->subprocess.CompletedProcess:
    "Run a sweep in a child process, as `expert-lab train` would."
    payload = json.dumps(dict(args=args, experts=experts, **kw))
    return subprocess.run([sys.executable, "-c", DRIVER, payload], cwd=REPO, env=env or clean_env(tmp),
                          capture_output=True, text=True, timeout=600)


def the_record(tmp:Path)->dict:
    [p] = (tmp/"runs"/"sweeps").glob("*/sweep.json")
    return read_json(p)


def run_folders(tmp:Path)->list:
    return sorted(p.parent for p in (tmp/"runs").glob("*/*/expert-*/*/config.json"))


def history_epochs(run_dir)->list:
    with open(Path(run_dir)/"history.csv") as f: return [int(r["epoch"]) for r in csv.DictReader(f)]


def metrics(run_dir)->dict: return read_json(Path(run_dir)/"metrics.json")


def notebook_text(path:Path)->str:
    nb = nbformat.read(path, as_version=4)
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream": out.append(o.get("text", ""))
            elif o.get("output_type") == "error": out.append(f"ERROR {o.ename}: {o.evalue}")
            else: out += [o.get("data", {}).get(k, "") for k in ("text/plain", "text/markdown", "text/html")]
    return "\n".join(out)


# the kill and the resume ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_killed_sweep_continues_with_exactly_the_missing_work(tmp_path):
    startup = tmp_path/"ipython"/"profile_default"/"startup"; startup.mkdir(parents=True)
    (startup/"00-kill-the-sweep.py").write_text(KILLER)
    killed = tmp_path/"killed"
    r = sweep(tmp_path, grid_args(tmp_path), env=clean_env(tmp_path, IPYTHONDIR=str(tmp_path/"ipython"), SWEEP_TEST_KILLED=str(killed)))
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])  # SIGKILLed by its third run, as planned
    rec = the_record(tmp_path)
    assert [r["point"] for r in rec["runs"]] == [{"lr": 0.05, "seed": 0}, {"lr": 0.05, "seed": 1}, {"lr": 0.1, "seed": 0},
                                                  {"lr": 0.1, "seed": 1}]
    first, second, third, fourth = rec["runs"]
    assert killed.read_text() == third["run_dir"] and fourth["run_dir"] is None  # killed in run 3; run 4 never began
    assert [metrics(r["run_dir"])["status"] for r in (first, second, third)] == ["completed", "completed", "running"]
    assert history_epochs(third["run_dir"]) == [1] and (Path(third["run_dir"])/"checkpoints"/"last.pt").is_file()
    before = {r["run_dir"]: metrics(r["run_dir"]) for r in (first, second)}

    r = sweep(tmp_path, grid_args(tmp_path))  # the same command again
    assert r.returncode == 0, r.stderr[-3000:]
    rec = the_record(tmp_path)
    assert [r["run_dir"] for r in rec["runs"][:3]] == [first["run_dir"], second["run_dir"], third["run_dir"]]
    assert {d: metrics(d) for d in before} == before, "completed runs are skipped, not touched"
    m3, m4 = metrics(third["run_dir"]), metrics(rec["runs"][3]["run_dir"])
    assert (m3["status"], m3["attempts"], m3["resumed_from_epoch"], m3["epochs_done"]) == ("completed", 2, 1, 2)
    assert history_epochs(third["run_dir"]) == [1, 2]  # continued from last.pt, no epoch twice
    assert (m4["status"], m4["attempts"], m4["epochs_done"]) == ("completed", 1, 2)
    assert len(run_folders(tmp_path)) == 4, "no other run folder was made"
    assert [(i["command"], i["runs"]) for i in rec["invocations"]] == [("test-sweep", 4), ("test-sweep", 2)]
    for run in rec["runs"]:  # each run's config is the point's
        j = read_json(Path(run["run_dir"])/"config.json")
        assert (j["config"]["lr"], j["config"]["seed"], j["config"]["epochs"]) == (run["point"]["lr"], run["point"]["seed"], 2)
        assert (j["sweep"], j["point"]) == (rec["id"], run["point"])  # config.json names its sweep and point
    assert f"sweep {rec['id']}: 4 completed" in r.stdout

    # the report: mean, spread and count over the two seeds of each learning rate
    summary = point_summary(sweep_frame(rec), report_keys(rec))
    assert sorted(summary.lr) == [0.05, 0.1] and list(summary.n) == [2, 2] and summary.val_std.notna().all()
    html = sweep_report(rec["id"], tmp_path/"runs")
    text = notebook_text(html.with_suffix(".ipynb"))
    assert "ERROR" not in text, text[-3000:]
    for col in ("val_mean", "val_std", "test_mean", "test_std", "vs_best"): assert col in text, col
    assert "Best point by mean validation accuracy" in text and "test accuracy was not used to choose it" in text
    best = summary.iloc[0]
    assert f"validation {best.val_mean:.4f} ± {best.val_std:.4f} over 2 seed(s)" in text
    assert 'src="data:image/png;base64,' in html.read_text()  # the accuracy-against-lr plot


@pytest.mark.slow
def test_failed_point_does_not_stop_the_others_and_is_retried_only_when_asked(tmp_path):
    args = grid_args(tmp_path, lr="0.05", seed="0", batch_size="32,5000", epochs=1)  # 5000 is more than digits has
    r = sweep(tmp_path, args)
    assert r.returncode == 1, r.stderr[-3000:]
    rec = the_record(tmp_path)
    good, bad = (r["run_dir"] for r in rec["runs"])
    assert metrics(good)["status"] == "completed" and metrics(bad)["status"] == "failed"
    [line] = [l for l in r.stdout.splitlines() if l.startswith("failed: ")]
    assert line.startswith("failed: batch_size=5000 expert 0: ") and "batch_size=5000" in line and bad in line
    assert "1 completed, 1 failed" in r.stdout

    r = sweep(tmp_path, args)  # not asked to retry: nothing runs
    assert r.returncode == 1 and metrics(bad)["attempts"] == 1 and metrics(good)["attempts"] == 1
    r = sweep(tmp_path, args, retry_failed=True)
    assert r.returncode == 1 and metrics(bad)["attempts"] == 2 and metrics(good)["attempts"] == 1
    assert len(run_folders(tmp_path)) == 2


# bad input: one line, exit 2, nothing created --------------------------------------------------------------------------

BAD = {  # name: (changes to the grid, run_sweep options, words the error must contain)
    "bad value in the grid": (dict(lr="0.1,abc"), {}, ("lr: expected a number, got 'abc'", "0.1,abc")),
    "out of range in one point": (dict(lr="0.1,-1"), {}, ("lr: must be > 0", "grid point lr=-1.0 seed=0")),
    "unknown model in the grid": (dict(model="wideresnet10_1,nosuchnet"), {}, ("model: unknown model 'nosuchnet'",)),
    "list of paths": (dict(runs_dir="a,b"), {}, ("runs_dir: takes one value, not a list",)),
    "list of data roots": (dict(data_root="a,b"), {}, ("data_root: takes one value, not a list",)),
    "repeated value": (dict(seed="0,1,0"), {}, ("seed: 0 appears twice",)),
    "unknown key": (dict(lrr="0.1,0.2"), {}, ("unknown config key 'lrr'", "did you mean 'lr'")),
    "expert out of range": ({}, dict(experts="3"), ("expert_id: must be in 0..0",)),
    "over 500 runs": (dict(seed=",".join(map(str, range(251)))), {}, ("502 runs is more than 500", "--yes")),
    "no such sweep": ({"lr": None, "seed": None}, dict(sweep_id="nope", experts=None), ("no sweep 'nope'",)),
    "bad sweep id": ({}, dict(sweep_id="../x"), ("'../x' is not a sweep id",)),
    "parallel 0": ({}, dict(parallel=0), ("parallel: must be an integer >= 1, got 0",)),
    "unknown executor": ({}, dict(executor="ray"), ("executor: 'ray' is not one of local, slurm",)),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, monkeypatch, name):
    for k in list(os.environ):
        if k in _CONFIG_ENV or k.startswith("EXPERT_LAB_"): monkeypatch.delenv(k)
    monkeypatch.setenv("EXPERT_LAB_SETTINGS", os.devnull)
    change, opts, words = BAD[name]
    args = {k: v for k, v in grid_args(tmp_path, **change).items() if v is not None}
    opts = dict(opts); experts = opts.pop("experts", "0")
    with pytest.raises(ConfigError) as e: run_sweep(args, experts, **opts)
    assert "\n" not in str(e.value)
    for w in words: assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path/"runs").exists()


def test_bad_input_exits_2_from_the_command(tmp_path):
    r = sweep(tmp_path, grid_args(tmp_path, lr="0.1,abc"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "expert-lab: error: lr: expected a number, got 'abc' (in the list '0.1,abc')\n"
    assert not (tmp_path/"runs").exists()


def test_rerun_with_a_different_grid_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERT_LAB_SETTINGS", os.devnull)
    rec, path = open_sweep(grid_args(tmp_path), "0", "mine")
    path.parent.mkdir(parents=True); write_json(path, rec)  # a recorded sweep (its runs not started)
    with pytest.raises(ConfigError, match=r"sweep mine: this grid differs from the recorded one \(lr=0.05 seed=0 expert 0: "
                                          r"epochs was 2, now 3\)"):
        run_sweep(grid_args(tmp_path, epochs=3), "0", sweep_id="mine")
    with pytest.raises(ConfigError, match=r"'lr=0.05 seed=2 expert 0' is not a recorded run"):
        run_sweep(grid_args(tmp_path, seed="0,1,2"), "0", sweep_id="mine")
    assert sorted(p.name for p in tmp_path.joinpath("runs").rglob("*")) == ["mine", "sweep.json", "sweeps"]


def test_dry_run_prints_the_grid_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERT_LAB_SETTINGS", os.devnull)
    assert run_sweep(grid_args(tmp_path, n_experts=2), "all", dry_run=True) == 0
    out = capsys.readouterr().out
    assert "4 point(s) x expert(s) = 8 run(s); 8 to run now (new sweep: nothing created yet)" in out
    assert "  lr: 0.05, 0.1\n  seed: 0, 1\n" in out and out.count(" pending ") == 8
    big = grid_args(tmp_path, seed=",".join(map(str, range(251))))
    assert run_sweep(big, "0", dry_run=True) == 0  # a dry run of a big grid needs no --yes
    assert "502 run(s)" in capsys.readouterr().out
    assert not (tmp_path/"runs").exists()


# Slurm: the whole grid as one array ----------------------------------------------------------------------------------

@pytest.mark.slurm
@pytest.mark.slow
def test_grid_goes_to_slurm_as_one_array(slurm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERT_LAB_SETTINGS", os.devnull)
    opts = dict(partition="debug", time_min=10, gpus_per_task=0, cpus_per_task=1, mem_gb=1, array_parallelism=2)
    args = grid_args(tmp_path, seed="0", n_experts=2, epochs=1, device="cpu")  # 2 points x 2 experts = 4 tasks
    assert run_sweep(args, "all", executor="slurm", slurm_opts=opts) == 0
    rec = the_record(tmp_path)
    jobs = [r["slurm_job"] for r in rec["runs"]]
    try:
        assert len({j.split("_")[0] for j in jobs}) == 1 and [j.split("_")[1] for j in jobs] == ["0", "1", "2", "3"], jobs
        assert wait_done(jobs) == {j: "COMPLETED" for j in jobs}
    finally:
        from expert_lab.slurm import slurm_states
        if left := [j for j, s in slurm_states(jobs).items() if s not in TERMINAL]: subprocess.run(["scancel", *left], timeout=60)
    for run in rec["runs"]:
        d = Path(run["run_dir"])
        m, cfg = metrics(d), read_json(d/"config.json")["config"]
        assert m["status"] == "completed" and m["epochs_done"] == 1 and (d/"report.html").is_file()
        assert (cfg["lr"], cfg["expert_id"]) == (run["point"]["lr"], run["expert_id"])
        assert read_json(d/"slurm.json")["job_id"] == run["slurm_job"]
    capsys.readouterr()
    assert run_sweep(args, "all", executor="slurm", slurm_opts=opts) == 0  # again: everything is done, nothing submitted
    assert "submitted 0 run(s)" in capsys.readouterr().out
    assert [r["slurm_job"] for r in the_record(tmp_path)["runs"]] == jobs
