"""Disk faults and disk use: a full disk ends a run as `failed` with one line and no temporary files left behind, and the
run resumes once there is room; a finished run keeps at most 1.5x its tested weights; old `best.pt` files still load."""
import errno, json, os, shutil, subprocess
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import isolated_env, run_cli
from expert_lab.checkpoint import IN_BEST, load_checkpoint, tested_weights as weights_tested  # not test_*: pytest would collect it
from expert_lab.files import DiskError, atomic_write
from expert_lab.runs import start_record
from expert_lab.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = ("train", "--model", "wideresnet10_1", "--dataset", "digits", "--n-experts", "1", "--epochs", "3",
         "--steps-per-epoch", "4", "--batch-size", "32", "--restart-period", "3")


@contextmanager
def tmpfs(where: Path, size: int):
    "A tmpfs of `size` bytes mounted at `where`, unmounted afterwards; the test is skipped unless we may mount one."
    if os.geteuid() != 0: pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try: yield where
    finally: subprocess.run(["umount", "-l", str(where)], check=False)


def grow(where: Path, size: str):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def temporaries(root: Path): return sorted(str(p) for p in root.rglob("*.tmp"))


def weight_bytes(sd: dict) -> int: return sum(v.numel()*v.element_size() for v in sd.values())


def stored_weight_bytes(ck: dict) -> int:
    "Bytes of the model and EMA weights a checkpoint holds (markers and dropped weights count nothing)."
    ws = [ck["model"], (ck.get("ema") or {}).get("module")]
    return sum(weight_bytes(w) for w in ws if isinstance(w, dict))


def plain(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_sec")} for r in history]


# --- atomic writes on a disk that really fills up
def test_a_write_the_full_disk_refuses_leaves_no_temporary(tmp_path):
    with tmpfs(tmp_path/"disk", 256*1024) as d:
        atomic_write(d/"last.pt", b"epoch 1")
        with pytest.raises(DiskError) as e: atomic_write(d/"last.pt", os.urandom(400*1024))
        assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
        assert str(e.value).startswith(f"no space left on device writing {d/'last.pt'} (needs ~410 kB, ")
        assert f"free on {d})" in str(e.value) and "\n" not in str(e.value)
        assert sorted(p.name for p in d.iterdir()) == ["last.pt"] and (d/"last.pt").read_bytes() == b"epoch 1"
        assert shutil.disk_usage(d).used < 64*1024  # the space the failed temporary took is free again


def test_a_failed_fsync_leaves_no_temporary(tmp_path, monkeypatch):
    atomic_write(tmp_path/"m.json", "{}")
    def fail(fd): raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(DiskError, match="input/output error writing"): atomic_write(tmp_path/"m.json", "{\"a\": 1}")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"] and (tmp_path/"m.json").read_text() == "{}"


# --- a run whose disk fills up: one line, recorded as failed, resumed once there is room
@pytest.mark.slow
def test_full_disk_fails_the_run_with_one_line_then_resume_matches(tmp_path):
    env = isolated_env(tmp_path, EXPERT_LAB_SETTINGS="/dev/null")
    ref = run_cli(tmp_path, *TRAIN, "--run-dir", tmp_path/"ref", env=env)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    best = (tmp_path/"ref"/"checkpoints"/"best.pt").stat().st_size
    # room for epoch 1 (best.pt, a full last.pt = weights + momentum, the report) but not for epoch 2's last.pt
    with tmpfs(tmp_path/"disk", int(4.6*best)) as disk:
        run = disk/"run"
        r = run_cli(tmp_path, *TRAIN, "--run-dir", run, env=env)
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        line = next((l for l in out.splitlines() if l.startswith("no space left on device writing ")), None)
        assert line is not None, out
        assert f"{run/'checkpoints'}/" in line and "free on" in line and f"free space, then: expert-lab resume {run}" in line
        assert "checkpoints/last.pt of epoch 1 is intact" in line, line
        assert "Traceback" not in out, out
        assert temporaries(disk) == []
        m = json.loads((run/"metrics.json").read_text())
        assert (m["status"], m["stop_reason"]) == ("failed", "error") and m["error"] == line, m
        assert load_checkpoint(run/"checkpoints"/"last.pt")["epoch"] == 1
        assert m["epochs_done"] == 1, m  # epoch 2 trained but was not saved: the record claims what the disk holds
        grow(disk, "64m")
        r = run_cli(tmp_path, "resume", run, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        got, want = (json.loads((d/"metrics.json").read_text()) for d in (run, tmp_path/"ref"))
        assert (got["status"], got["epochs_done"], got["resumed_from_epoch"]) == ("completed", 3, 1)
        assert (got["test_acc"], got["test_loss"], got["best_epoch"]) == (want["test_acc"], want["test_loss"], want["best_epoch"])
        assert (run/"history.csv").read_text().splitlines()[0] == (tmp_path/"ref"/"history.csv").read_text().splitlines()[0]
        rows = lambda d: [l.split(",")[:6] for l in (d/"history.csv").read_text().splitlines()]  # without the timings
        assert rows(run) == rows(tmp_path/"ref")
        assert temporaries(disk) == []


def test_a_disk_error_in_a_hook_ends_the_run_as_failed(tiny, tmp_path):
    from expert_lab.files import disk_error
    class FullDisk:  # as the history.csv hook meets a full disk after epoch 2's checkpoint was written
        def on_epoch_end(self, record, state):
            if record["epoch"] == 2: raise disk_error(OSError(errno.ENOSPC, "No space"), tmp_path/"history.csv", 5_000_000)
    r = train(tiny(epochs=3), run_dir=tmp_path, hooks=[FullDisk()], progress="none")
    m = r.metrics
    assert (m["status"], m["stop_reason"], m["test_acc"], m["epochs_done"]) == ("failed", "error", None, 2)
    assert m["error"].startswith(f"no space left on device writing {tmp_path/'history.csv'} (needs ~5.00 MB, ")
    assert m["error"].endswith(f"checkpoints/last.pt of epoch 2 is intact; free space, then: expert-lab resume {tmp_path}")


# --- what a finished run keeps
def test_a_finished_run_keeps_at_most_one_and_a_half_times_its_tested_weights(tiny, tmp_path):
    for epochs in (2, 3):  # the last epoch validated best (2), an earlier one did (3)
        d = tmp_path/f"e{epochs}"
        r = train(tiny(epochs=epochs), run_dir=d, progress="none")
        tested = weight_bytes(r.model.state_dict())
        last, best = (load_checkpoint(d/"checkpoints"/f) for f in ("last.pt", "best.pt"))
        assert last["optimizer"] is None and last["stop_reason"] == "epochs_done"
        assert best["epoch"] == r.metrics["best_epoch"] and "optimizer" not in best
        assert all(torch.equal(v, r.model.state_dict()[k]) for k, v in weights_tested(best).items())
        stored = stored_weight_bytes(last) + stored_weight_bytes(best)
        files = sum(p.stat().st_size for p in (d/"checkpoints").iterdir())
        if r.metrics["best_epoch"] == epochs: assert last["model"] == IN_BEST and stored == tested
        else: assert {v.dtype for v in last["model"].values() if v.is_floating_point()} == {torch.float16} and stored <= 1.5*tested + 1024  # the int64 batch counters stay whole
        assert files <= 1.5*tested + 64_000, (epochs, files, tested)  # + history, config, random states, zip headers
    assert load_checkpoint(tmp_path/"e2"/"checkpoints"/"last.pt")["model"] == IN_BEST  # both cases were seen
    assert isinstance(load_checkpoint(tmp_path/"e3"/"checkpoints"/"last.pt")["model"], dict)


def test_an_early_stopped_run_keeps_only_its_tested_weights_and_evaluates_again(tiny, tmp_path):
    cfg = tiny(epochs=5, min_epochs=1, patience=1)
    r = train(cfg, run_dir=tmp_path, progress="none")
    assert r.metrics["stop_reason"] == "early_stop", r.metrics
    last = load_checkpoint(tmp_path/"checkpoints"/"last.pt")
    assert (last["model"], last["optimizer"]) == (None, None)
    assert sum(p.stat().st_size for p in (tmp_path/"checkpoints").iterdir()) <= weight_bytes(r.model.state_dict()) + 64_000
    again = train(cfg, run_dir=tmp_path, progress="none")
    assert (again.metrics["status"], again.metrics["test_acc"], again.metrics["restarts"]) == ("completed", r.metrics["test_acc"], 1)


def test_keep_optimizer_keeps_the_full_state_and_more_epochs_continue_exactly(tiny, tmp_path):
    cfg = tiny(keep_optimizer=True)
    ref = train(cfg, progress="none")
    first = train(replace(cfg, epochs=2), run_dir=tmp_path, progress="none")
    last = load_checkpoint(tmp_path/"checkpoints"/"last.pt")
    assert last["optimizer"]["state"] and isinstance(last["model"], dict)
    assert all(v.dtype != torch.float16 for v in last["model"].values())
    r = train(cfg, run_dir=tmp_path, progress="none")
    assert (r.metrics["status"], r.metrics["resumed_from_epoch"]) == ("completed", 2) and first.metrics["epochs_done"] == 2
    assert plain(r.history) == plain(ref.history) and r.metrics["test_acc"] == ref.metrics["test_acc"]


def test_more_epochs_without_the_optimizer_go_on_and_say_so(tiny, tmp_path, capsys):
    first = train(tiny(epochs=3), run_dir=tmp_path, progress="none")  # its best epoch (2) is not its last: float16 final weights
    capsys.readouterr()
    r = train(tiny(epochs=4), run_dir=tmp_path, progress="lines")
    lines = capsys.readouterr().out.splitlines()
    warn = [l for l in lines if l.startswith("warning:")]
    assert warn == [f"warning: {tmp_path/'checkpoints'/'last.pt'} holds no optimizer state (keep_optimizer was off when the run "
                    f"finished): continuing from epoch 3's weights (kept in float16) with a fresh SGD momentum"], lines
    assert (r.metrics["status"], r.metrics["epochs_done"], r.metrics["resumed_from_epoch"]) == ("completed", 4, 3)
    assert plain(r.history[:3]) == plain(first.history) and r.history[3]["epoch"] == 4


def test_an_old_full_copy_best_pt_still_loads_for_resume_and_evaluation(tiny, tmp_path):
    from expert_lab.ensemble import load_expert
    cfg = tiny(epochs=1, keep_optimizer=True)
    new, old = tmp_path/"new", tmp_path/"old"
    train(cfg, run_dir=new, progress="none")
    shutil.copytree(new, old)
    ck = old/"checkpoints"
    (ck/"best.pt").write_bytes((ck/"last.pt").read_bytes())  # how best.pt was written before: a byte copy of last.pt
    assert "optimizer" in load_checkpoint(ck/"best.pt")
    for d in (new, old): start_record(d, cfg, {})  # the config.json that load_expert reads
    a, b = (load_expert(d, 10).state_dict() for d in (new, old))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rn, ro = (train(replace(cfg, epochs=2), run_dir=d, progress="none") for d in (new, old))
    assert ro.metrics["resumed_from_epoch"] == 1 and plain(ro.history) == plain(rn.history)
    assert ro.metrics["test_acc"] == rn.metrics["test_acc"]
