"""Expert job arrays on a real Slurm (start one with `tools/slurm.sh start`): arrays that finish, a requeued task that
resumes, a failing expert beside succeeding ones, and settings the cluster cannot satisfy. The tasks execute the real
training notebook (tiny: the bundled `digits` images, `wideresnet10_1`, a few steps per epoch). The tests marked `slurm`
need the cluster; the last ones (the shipped settings.ini) need none."""
import configparser, csv, os, re, shutil, subprocess, time
from dataclasses import asdict, fields
from pathlib import Path

import pytest

from expert_lab.config import TrainConfig, coerce, project_root, read_settings, resolve_config, settings_values
from expert_lab.files import read_json
from conftest import HANG_S, SLURM_FINAL as TERMINAL, wait_slurm as wait_done
from expert_lab.slurm import SlurmError, SlurmResources, slurm_resources, slurm_state, slurm_states, submit_experts



@pytest.fixture
def settings():
    "Small tasks on the local test cluster's partition."
    cp = configparser.ConfigParser()
    cp.read_dict({"slurm": dict(partition="debug", time_min="10", gpus_per_task="0", cpus_per_task="1", mem_gb="1")})
    return cp


@pytest.fixture
def submit():
    "`submit_experts`, cancelling at teardown whatever a failed test left queued or running."
    ids = []
    def _submit(*args, **kw):
        jobs = submit_experts(*args, **kw)
        ids.extend(j for j, _ in jobs)
        return jobs
    yield _submit
    if left := [j for j, s in slurm_states(ids).items() if s not in TERMINAL]: subprocess.run(["scancel", *left], timeout=60)


def experts(tmp_path, n, epochs, steps=2, **kw):
    "n tiny experts of one partition, with run folders under tmp_path/runs; `kw` changes every expert."
    args = dict(dataset="digits", model="wideresnet10_1", n_experts=n, epochs=epochs, steps_per_epoch=steps, batch_size=32,
                device="cpu", runs_dir=str(tmp_path/"runs")) | kw
    return [resolve_config({**args, "expert_id": k}, env={}, settings=configparser.ConfigParser()) for k in range(n)]


def history_epochs(run_dir):
    with open(Path(run_dir)/"history.csv") as f: return [int(r["epoch"]) for r in csv.DictReader(f)]


@pytest.mark.slurm
@pytest.mark.slow
def test_array_of_experts_all_finish(slurm, settings, submit, tmp_path):
    jobs = submit(experts(tmp_path, 2, epochs=2), settings)
    # what submission returns: one array's task ids, each with a run folder that already records it
    assert len({j.split("_")[0] for j, _ in jobs}) == 1 and [j.split("_")[1] for j, _ in jobs] == ["0", "1"], jobs
    assert [d.parent.name for _, d in jobs] == ["expert-0", "expert-1"]
    assert all(d.parent.parent == tmp_path/"runs"/"wideresnet10_1"/"iid-2" for _, d in jobs)
    assert [read_json(d/"slurm.json")["job_id"] for _, d in jobs] == [j for j, _ in jobs]
    assert set(slurm_states([j for j, _ in jobs]).values()) <= {"PENDING", "RUNNING", "COMPLETED"}  # Slurm knows them
    assert wait_done([j for j, _ in jobs], timeout=HANG_S) == {j: "COMPLETED" for j, _ in jobs}
    for job_id, d in jobs:
        rec, metrics = read_json(d/"slurm.json"), read_json(d/"metrics.json")
        assert rec["job_id"] == job_id and rec["restarts"] == 0 and [s["job_id"] for s in rec["starts"]] == [job_id]
        assert rec["resources"]["partition"] == "debug"
        assert Path(rec["stdout"]).is_relative_to(tmp_path/"runs"/"slurm-logs") and Path(rec["stdout"]).exists()
        assert metrics["status"] == "completed" and metrics["epochs_done"] == 2 and metrics["test_acc"] is not None
        assert metrics["provenance"]["slurm_job_id"] == job_id.split("_")[0]  # the notebook ran inside the Slurm task
        assert history_epochs(d) == [1, 2] and (d/"report.html").exists()
    assert slurm_state(jobs[0][0]) == "COMPLETED"


@pytest.mark.slurm
@pytest.mark.slow
def test_requeued_task_resumes_in_its_run_folder(slurm, settings, submit, tmp_path):
    epochs = 4  # requeued after epoch 1: three epochs are left, far more than the few seconds a stop takes
    [(job_id, d)] = submit(experts(tmp_path, 1, epochs=epochs, steps=3), settings)
    history, end = d/"history.csv", time.time() + 180
    while not (history.exists() and history_epochs(d)):  # history.csv gets its first row after last.pt is written
        assert time.time() < end, f"no epoch finished after 180 s; job {job_id} is {slurm_state(job_id)}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    assert wait_done([job_id], timeout=HANG_S) == {job_id: "COMPLETED"}
    rec, metrics = read_json(d/"slurm.json"), read_json(d/"metrics.json")
    assert rec["restarts"] == 1 and [s["restart_count"] for s in rec["starts"]] == [0, 1]
    assert metrics["status"] == "completed" and metrics["epochs_done"] == epochs
    assert metrics["resumed_from_epoch"] >= 1 and metrics["restarts"] == 1  # continued from last.pt, not from scratch
    assert history_epochs(d) == list(range(1, epochs + 1))  # one continuous history, no epoch twice
    assert (d/"previous"/"report-1.ipynb").exists()  # the interrupted attempt's report is kept


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_expert_fails_its_job_only(slurm, settings, submit, tmp_path):
    cfgs = experts(tmp_path, 3, epochs=1)
    cfgs[1] = experts(tmp_path, 3, epochs=1, dataset="folder", data_root=str(tmp_path/"no-such-dataset"))[1]
    jobs = submit(cfgs, settings)
    states = wait_done([j for j, _ in jobs], timeout=HANG_S)
    assert [states[j] for j, _ in jobs] == ["COMPLETED", "FAILED", "COMPLETED"]
    assert [read_json(d/"metrics.json")["status"] for _, d in jobs] == ["completed", "failed", "completed"]
    assert "no-such-dataset" in read_json(jobs[1][1]/"metrics.json")["error"]
    assert (jobs[1][1]/"report.html").exists()  # the failed report is in its run folder
    assert "RunFailed" in Path(read_json(jobs[1][1]/"slurm.json")["stderr"]).read_text()


@pytest.mark.slurm
@pytest.mark.parametrize("override, message", [
    (dict(partition="nope"), "partition: 'nope' is not a partition of this cluster; choose one of debug"),
    (dict(mem_gb=100_000), "mem_gb: 100000 GB is more than the largest node of partition 'debug' has"),
    (dict(cpus_per_task=1000), "cpus_per_task: 1000 is more than the largest node"),
    (dict(gpus_per_task=1), "gpus_per_task: 1 is more than the largest node of partition 'debug' has (0)"),
    (dict(time_min=0), "time_min: must be > 0, got 0"),
])
def test_bad_settings_rejected_before_submission(slurm, settings, tmp_path, override, message):
    with pytest.raises(SlurmError, match=message.replace("(", r"\(").replace(")", r"\)")):
        submit_experts(experts(tmp_path, 2, epochs=1), settings, **override)
    assert not (tmp_path/"runs").exists()  # no run folder, no log folder: nothing reached sbatch


@pytest.mark.slurm
def test_sbatch_refusal_leaves_no_run_folders(slurm, settings, tmp_path):
    with pytest.raises(SlurmError, match="sbatch refused the array"):
        submit_experts(experts(tmp_path, 2, epochs=1), settings, constraint="no-such-feature")
    runs = tmp_path/"runs"
    assert list(runs.glob("*/*/expert-*/*")) == [] and list(runs.glob("slurm-logs/*")) == []  # no run or log folder left
    assert [p for p in runs.rglob("*") if p.is_file()] == []


@pytest.mark.slurm
def test_unknown_job_state(slurm):
    assert slurm_state("999999_0") == "UNKNOWN"


# --- the shipped settings.ini: no cluster needed
def _shown_defaults(path)->configparser.ConfigParser:
    "settings.ini with every commented-out `# key = value` line uncommented."
    text = re.sub(r"(?m)^# (\w+ =.*)$", r"\1", Path(path).read_text())
    cp = configparser.ConfigParser(); cp.read_string(text)
    return cp


def test_shipped_settings_set_nothing():
    cp = read_settings(project_root()/"settings.ini")
    assert cp.sections() == ["paths", "training", "slurm", "tracking"]
    assert settings_values(cp) == {}  # no value's source is `settings` until a site sets one
    assert slurm_resources(cp) == SlurmResources()  # an absent [slurm] key falls back to the built-in default


def test_shipped_settings_show_the_built_in_defaults():
    shown = _shown_defaults(project_root()/"settings.ini")
    assert set(shown["slurm"]) == {f.name for f in fields(SlurmResources)}  # every Slurm key, each with its meaning
    assert slurm_resources(shown) == SlurmResources()
    built_in = asdict(TrainConfig())
    values = settings_values(shown)  # also checks that every key is a config key
    assert set(values) == {"data_root", "runs_dir", "device", "dataset", "n_experts", "partition", "wandb_project",
                           "wandb_mode", "tensorboard"}
    assert {k: coerce(k, v) for k, v in values.items()} == {k: built_in[k] for k in values}


def test_an_absent_slurm_key_falls_back_to_its_own_default():
    cp = configparser.ConfigParser(); cp.read_string("[slurm]\n# partition = debug\ntime_min = 30\naccount =\n")
    assert slurm_resources(cp) == SlurmResources(time_min=30)


def test_records_share_one_time_stamp():
    "slurm.json and a sweep's record are stamped by one function, in the lower module (sweeps imports slurm)."
    import datetime as dt
    from expert_lab import slurm, sweeps
    assert sweeps.now_iso is slurm.now_iso
    assert not hasattr(sweeps, "_timestamp") and not hasattr(slurm, "_now")
    assert dt.datetime.fromisoformat(slurm.now_iso()).microsecond == 0


def test_a_task_imports_this_checkout_wherever_it_starts(tmp_path):
    "The job set-up every array runs first (experts, sweeps, tune workers): this checkout's package and project root."
    import sys, expert_lab
    from expert_lab.slurm import job_setup_lines
    script = "; ".join([*job_setup_lines(), 'python -c "import expert_lab, expert_lab.config as c; print(expert_lab.__file__); print(c.project_root())"'])
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(tmp_path)}  # as a bare Slurm task might
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expert_lab.__file__, str(project_root())]
