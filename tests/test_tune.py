"""`expert-lab tune`: bad input refused in one line with nothing created; a study of 6 trials on the bundled digits
with ASHA pruning, killed during trial 3 and finished by the same command (the killed trial resumed in its folder);
the study report; and a study run as a Slurm array of 2 workers sharing one journal (marked `slurm`)."""
import json, os, re, shlex, signal, subprocess, sys, threading, time
from pathlib import Path

import pytest

from conftest import HANG_S, REPO, isolated_env, wait_slurm
from expert_lab.files import read_json

TUNE = "import sys; from expert_lab.tune import main; sys.exit(main(sys.argv[1:]))"  # what `expert-lab tune` calls
TINY = ["--model", "wideresnet10_1", "--dataset", "digits", "--n-experts", "2", "--batch-size", "32", "--steps-per-epoch", "2",
        "--restart-period", "3", "--channels-last", "false"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    "This process resolves configs as the isolated command would: settings, runs and data under tmp_path."
    for k in [k for k in os.environ if k.startswith("EXPERT_LAB_") or k in ("MODEL_TYPE", "EXPERT_ID", "EPOCHS")]: monkeypatch.delenv(k)
    for k, v in isolated_env(tmp_path).items():
        if k.startswith("EXPERT_LAB_"): monkeypatch.setenv(k, v)
    return tmp_path


def refused(capsys, args):
    "Run `tune` in this process; assert exit 2 with one error line; return the line."
    from expert_lab.tune import main
    rc = main(list(map(str, args)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("expert-lab: error: "), (rc, err)
    return err[0]


BAD = {
    "low not below high": (["--lr", "0.5:0.02"], "lr: the range '0.5:0.02' has its low (0.5) not below its high (0.02)"),
    "equal ends": (["--epochs", "3:3"], "epochs: the range '3:3' has its low (3) not below its high (3)"),
    "log range touching 0": (["--weight-decay", "0:1e-3:log"], "weight_decay: a log range must stay above 0"),
    "unknown key": (["--lerning-rate", "0.02:0.5"], "lerning-rate"),
    "path": (["--data-root", "data,data2", "--lr", "0.1:1"], "data_root: cannot be tuned"),
    "runs folder": (["--runs-dir", "a,b", "--lr", "0.1:1"], "runs_dir: cannot be tuned"),
    "device": (["--device", "cpu,cuda", "--lr", "0.1:1"], "device: cannot be tuned"),
    "executor": (["--executor", "local,slurm", "--lr", "0.1:1"], "--executor"),
    "trials 0": (["--lr", "0.1:1", "--trials", "0"], "trials: must be >= 1, got 0"),
    "test metric": (["--lr", "0.1:1", "--metric", "test_acc"], "--metric"),
    "out of range": (["--momentum", "0.5:1.5"], "momentum: must be in [0, 1], got 1.5"),
    "nothing searched": (["--lr", "0.1"], "nothing to search"),
    "a trial's key": (["--lr", "0.1:1", "--trial", "3"], "option --trial does not apply to tune (the tuner sets it for each trial)"),
    "not the array's size": (["--lr", "0.1:1", "--array-parallelism", "2"], "unknown option --array-parallelism"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_nothing_created(here, capsys, case):
    args, msg = BAD[case]
    assert msg in refused(capsys, [*args, "--dataset", "digits"])
    assert not (here/"runs").exists()


def test_a_changed_space_is_refused_naming_the_first_difference(here, capsys):
    from expert_lab.tune import build_parser, config_flags, create_study, open_study
    ns = build_parser().parse_args(["--lr", "0.02:0.5:log", "--dataset", "digits", "--study", "s1"])
    rec, path = open_study(ns, config_flags(ns))
    create_study(rec, path, "expert-lab tune --lr 0.02:0.5:log --dataset digits --study s1")
    before = sorted(p.name for p in path.iterdir())
    line = refused(capsys, ["--lr", "0.01:0.5:log", "--dataset", "digits", "--study", "s1"])
    assert "study s1: this command differs from the recorded study (the space lr: was 0.02:0.5:log, now 0.01:0.5:log)" in line
    assert "differs" in refused(capsys, ["--lr", "0.02:0.5:log", "--dataset", "digits", "--study", "s1", "--sampler", "random"])
    assert sorted(p.name for p in path.iterdir()) == before and len(read_json(path/"study.json")["invocations"]) == 1
    assert not list((here/"runs").glob("wideresnet*"))  # no run folder either


def test_dry_run_prints_the_space_and_creates_nothing(here, capsys):
    from expert_lab.tune import main
    assert main(["--lr", "0.02:0.5:log", "--model", "wideresnet10_1,wideresnet16_1", "--dataset", "digits", "--trials", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "0 of 5 trials" in out and "lr: 0.02:0.5:log" in out and "model: wideresnet10_1,wideresnet16_1" in out
    assert str(here/"runs"/"studies") in out and not (here/"runs").exists()


def test_workers_are_submitted_with_the_training_arrays_job_setup(here, monkeypatch):
    "Tune's Slurm workers and the training arrays start the same way (`slurm.job_setup_lines`), with the Slurm flags given."
    from types import SimpleNamespace
    from expert_lab import slurm, tune
    seen = {}
    class Executor:
        def __init__(self, folder): seen["folder"] = folder
        def update_parameters(self, **kw): seen.update(kw)
        def map_array(self, fn, *args): return [SimpleNamespace(job_id=f"7_{i}") for i in range(len(args[0]))]
    monkeypatch.setattr(tune.submitit, "SlurmExecutor", Executor)
    monkeypatch.setattr(tune, "check_slurm_resources", lambda res: res)  # no cluster to ask here
    ns = tune.build_parser().parse_args(["--lr", "0.1:1", "--executor", "slurm", "--time-min", "7", "--mem-gb", "1.5"])
    ids = tune.submit_workers(here/"study", dict(name="s", trials=4), 2, tune.slurm_overrides(ns))
    assert ids == ["7_0", "7_1"] and seen["array_parallelism"] == 2
    assert seen["setup"] == slurm.job_setup_lines() and (seen["time"], seen["mem"]) == (7, "1536M")


def _tune(tmp, args, **kw):
    return subprocess.Popen([sys.executable, "-c", TUNE, *args], cwd=REPO, env=isolated_env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def _descendants(pid):
    "The processes below `pid` (the kernel runs in a session of its own, so killing the group would miss it)."
    kids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        kids.setdefault(int(f[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo: out += (new := kids.get(todo.pop(), [])); todo += new
    return out


def _study(tmp, name):
    from expert_lab.studies import load_study
    return load_study(tmp/"runs"/"studies"/name)


def _kill_when(tmp, args, ready):
    "Start `tune`; once `ready(trial dirs so far)` holds, SIGKILL it and its kernel (a lost node); return the trial dirs."
    p, lines, dirs = _tune(tmp, args), [], {}
    def watch():
        for line in p.stdout:
            lines.append(line)
            if (m := re.match(r"trial (\d+): .*: (?:training|resuming) in (/\S+)$", line.strip())): dirs[int(m[1])] = Path(m[2])
    t = threading.Thread(target=watch, daemon=True); t.start()
    end = time.time() + HANG_S
    while not ready(dirs):
        assert p.poll() is None and time.time() < end, "".join(lines)
        time.sleep(0.05)
    for pid in [*_descendants(p.pid), p.pid]: os.kill(pid, signal.SIGKILL)
    p.wait(); t.join(5)
    return dirs


def _epochs(d):
    return [int(line.split(",")[0]) for line in (d/"history.csv").read_text().splitlines()[1:]] if (d/"history.csv").exists() else []


@pytest.mark.slow
def test_six_trials_pruned_killed_resumed_and_reported(tmp_path):
    # lr from hopeless to too large; ASHA over 3 epochs judges each trial at epoch 1 against the trials before it
    args = [*TINY, "--lr", "0.0005:2:log", "--epochs", "3", "--trials", "6", "--study", "digits", "--pruner", "asha"]
    # 1. killed in trial 0's second epoch (ASHA never stops the first trial: it is the best at its rung)
    d0 = _kill_when(tmp_path, args, lambda dirs: 0 in dirs and _epochs(dirs[0]) == [1])[0]
    trials = _study(tmp_path, "digits").get_trials()
    assert [x.state.name for x in trials] == ["RUNNING"]  # the journal has no heartbeat: it would stay there
    reported = dict(trials[0].intermediate_values)
    assert list(reported) == [1] and (d0/"checkpoints"/"last.pt").exists()
    # 2. the same command resumes it, goes on, and is killed during trial 3 (as soon as its kernel has started)
    dirs = _kill_when(tmp_path, args, lambda dirs: 2 in dirs and (read_json(dirs[2]/"metrics.json") or {}).get("status") == "running")
    d2 = dirs[2]
    assert dirs[0] == d0 and [x.state.name for x in _study(tmp_path, "digits").get_trials()][2] == "RUNNING"
    # 3. the same command finishes the study
    again = _tune(tmp_path, args); out, _ = again.communicate(timeout=HANG_S)
    assert again.returncode == 0 and f"trial 2: " in out and f"resuming in {d2}" in out, out
    trials = _study(tmp_path, "digits").get_trials()
    assert [x.number for x in trials] == list(range(6)) and "RUNNING" not in {x.state.name for x in trials}, [x.state for x in trials]
    # trial 0: resumed from last.pt in its own folder, with its parameters and the value it had reported
    m0 = read_json(d0/"metrics.json")
    assert trials[0].state.name == "COMPLETE" and trials[0].user_attrs["run_dir"] == str(d0) and m0["resumed_from_epoch"] == 1
    assert _epochs(d0) == [1, 2, 3] and trials[0].intermediate_values[1] == reported[1] and sorted(trials[0].intermediate_values) == [1, 3]  # ASHA's rungs
    assert read_json(d0/"config.json")["config"]["lr"] == trials[0].params["lr"]
    # trial 2: resumed in its folder, not replaced
    assert trials[2].user_attrs["run_dir"] == str(d2) and read_json(d2/"metrics.json")["attempts"] == 2
    assert read_json(d2/"config.json")["config"]["trial"] == 2 and read_json(d2/"config.json")["config"]["study"] == "digits"
    # exactly six run folders, one per trial, each with its report
    folders = sorted((tmp_path/"runs"/"wideresnet10_1"/"iid-2"/"expert-0").iterdir())
    assert sorted(x.user_attrs["run_dir"] for x in trials) == [str(f) for f in folders] and all((f/"report.html").exists() for f in folders)
    # pruning: at least one trial stopped before its 3 epochs, shown as pruned in the run listing
    from expert_lab.catalog import read_run
    pruned = [x for x in trials if x.state.name == "PRUNED"]
    assert pruned, out
    for x in pruned:
        row = read_run(x.user_attrs["run_dir"])
        assert row["status"] == "pruned" and row["epochs"] < 3 and row["study"] == "digits" and row["trial"] == x.number, row
        assert (Path(row["path"])/"checkpoints"/"last.pt").exists() and row["test_acc"] is None
    # the study report names the best trial
    best = max((x for x in trials if x.state.name == "COMPLETE"), key=lambda x: x.value)
    r = subprocess.run([sys.executable, "-c", "import sys; from expert_lab.tune import compare_study; sys.exit(compare_study('digits'))"],
                       cwd=REPO, env=isolated_env(tmp_path), capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stdout + r.stderr
    html = (tmp_path/"runs"/"studies"/"digits"/"report.html").read_text()
    assert f"best trial: {best.number} (validation accuracy {best.value:.4f}" in html
    assert "--seed 0,1,2" in html and "chosen by validation accuracy" in html
    # the command that confirms the winner over seeds is one `expert-lab train` takes (its dry run plans 3 runs)
    from expert_lab.studies import confirm_command
    cmd = confirm_command(read_json(tmp_path/"runs"/"studies"/"digits"/"study.json"), best.params)
    assert cmd.startswith("expert-lab train ") and "--study" not in cmd, cmd
    dry = subprocess.run([sys.executable, "-c", "import sys; from expert_lab.cli import main; sys.exit(main(sys.argv[1:]))",
                          *shlex.split(cmd)[1:], "--dry-run"], cwd=REPO, env=isolated_env(tmp_path), capture_output=True,
                         text=True, timeout=HANG_S)
    assert dry.returncode == 0, dry.stdout + dry.stderr


@pytest.mark.slow
def test_parallel_workers_share_one_journal(tmp_path):
    args = [*TINY, "--lr", "0.01:0.5:log", "--epochs", "1", "--trials", "3", "--study", "par", "--pruner", "none", "--parallel", "2"]
    out, _ = _tune(tmp_path, args).communicate(timeout=HANG_S)
    assert "study par: 3 complete" in out, out
    trials = _study(tmp_path, "par").get_trials()
    assert [x.number for x in trials] == [0, 1, 2] and {x.state.name for x in trials} == {"COMPLETE"}
    assert len({x.user_attrs["run_dir"] for x in trials}) == 3 and len({x.params["lr"] for x in trials}) == 3
    assert sorted(re.findall(r"^trial (\d+): lr=", out, re.M)) == ["0", "1", "2"]  # each trial started once
    assert max(read_json(Path(x.user_attrs["run_dir"])/"metrics.json")["attempts"] for x in trials) == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_a_study_as_a_slurm_array_of_two_workers(slurm, tmp_path):
    (tmp_path/"settings.ini").write_text("[slurm]\npartition = debug\ntime_min = 10\ngpus_per_task = 0\ncpus_per_task = 1\nmem_gb = 1\n")
    args = [*TINY, "--lr", "0.01:0.5:log", "--epochs", "2", "--trials", "4", "--study", "array", "--pruner", "none",
            "--executor", "slurm", "--workers", "2"]
    out, _ = _tune(tmp_path, args).communicate(timeout=HANG_S)
    ids = [j for j in out.strip().splitlines()[-1].split(": ")[-1].split(", ") if j]
    assert len(ids) == 2 and len({j.split("_")[0] for j in ids}) == 1, out
    assert set(wait_slurm(ids).values()) == {"COMPLETED"}, out
    trials = _study(tmp_path, "array").get_trials()
    assert [x.number for x in trials] == [0, 1, 2, 3] and {x.state.name for x in trials} == {"COMPLETE"}
    dirs = [Path(x.user_attrs["run_dir"]) for x in trials]
    assert len(set(dirs)) == 4
    tasks = set()
    for d in dirs:
        m = read_json(d/"metrics.json")
        assert m["status"] == "completed" and m["epochs_done"] == 2 and (d/"report.html").exists(), m
        tasks.add(m["provenance"]["slurm_task_id"])
    assert tasks == {"0", "1"}  # both workers pulled trials from the one journal
