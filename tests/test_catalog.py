"""Listing runs survives damage (expert_lab.catalog): every kind of damaged folder is one `damaged` row with its reason,
next to intact runs that are read in full; a run whose process was killed is `interrupted` at its last saved epoch."""
from __future__ import annotations
import os, signal, subprocess, sys, textwrap
from pathlib import Path

import pytest

from expert_lab.catalog import damaged_note, format_runs, latest_completed, list_runs, read_run, runs_frame
from expert_lab.files import write_csv, write_json


def make_run(root: Path, model="wideresnet10_1", part="iid", n=2, k=0, stamp="20260101-120000-0001", status="completed",
             epochs=3, started="2026-01-01T12:00:00", **metrics) -> Path:
    "The files a run leaves (as runs.start_record, train_expert and the trainer write them), without training."
    d = root/model/f"{part}-{n}"/f"expert-{k}"/stamp
    (d/"checkpoints").mkdir(parents=True)
    # a config that could only ever train for a moment, should a command fail to refuse the folder
    cfg = dict(model=model, partition=part, n_experts=n, expert_id=k, dataset="digits", epochs=1, steps_per_epoch=1, batch_size=8)
    write_json(d/"config.json", {"config": cfg, "sources": {}})
    rec = dict(status=status, model=model, partition=part, n_experts=n, expert_id=k, dataset="digits", started=started)
    if status == "completed": rec |= dict(epochs_done=epochs, best_val_acc=0.61, test_acc=0.58, duration_s=30.0)
    write_json(d/"metrics.json", rec | metrics)
    write_csv(d/"history.csv", [dict(epoch=e, val_acc=0.2*e) for e in range(1, epochs + 1)], ["epoch", "val_acc"])
    (d/"checkpoints"/"last.pt").write_bytes(b"weights")
    return d


DAMAGE = {  # what goes wrong -> how to do it to a run folder, and the start of the reason it must give
    "metrics not json": (lambda d: (d/"metrics.json").write_text('{"status": "completed", "test_a'), "metrics.json: not valid JSON"),
    "metrics empty": (lambda d: (d/"metrics.json").write_text(""), "metrics.json: empty"),
    "metrics missing": (lambda d: (d/"metrics.json").unlink(), "metrics.json is missing"),
    "metrics a list": (lambda d: (d/"metrics.json").write_text("[]"), "metrics.json: not a JSON object"),
    "metrics binary": (lambda d: (d/"metrics.json").write_bytes(b"\x80\x81"), "metrics.json: cannot be read"),
    "status unknown": (lambda d: write_json(d/"metrics.json", dict(status="finished")), "metrics.json: status 'finished'"),
    "accuracy text": (lambda d: write_json(d/"metrics.json", dict(status="completed", test_acc="high")), "metrics.json: test_acc 'high'"),
    "config not json": (lambda d: (d/"config.json").write_text("{"), "config.json: not valid JSON"),
    "config missing": (lambda d: (d/"config.json").unlink(), "config.json is missing"),
    "history cut": (lambda d: (d/"history.csv").write_text("epoch,val_acc\n1,0.2\n2"), "history.csv: row 3 has 1 fields"),
    "history epoch": (lambda d: (d/"history.csv").write_text("epoch,val_acc\none,0.2\n"), "history.csv: row 2: epoch 'one'"),
    "slurm not json": (lambda d: (d/"slurm.json").write_text("job"), "slurm.json: not valid JSON"),
    "no weights": (lambda d: (d/"checkpoints"/"last.pt").unlink(), "completed, but checkpoints/"),
}


@pytest.fixture
def runs(tmp_path):
    "Two intact runs and one damaged folder per kind of damage."
    root = tmp_path/"runs"
    good = [make_run(root, k=0, started="2026-01-02T00:00:00"), make_run(root, model="resnet18", k=1, status="failed")]
    bad = {}
    for i, (name, (damage, _)) in enumerate(DAMAGE.items()):
        damage(d := make_run(root, k=i % 2, stamp=f"damaged-{i:02d}"))
        bad[name] = d
    return root, good, bad


def test_every_damage_is_one_row_and_hides_nothing(runs):
    root, good, bad = runs
    rows = {r["path"]: r for r in list_runs(root)}
    assert len(rows) == len(good) + len(bad)
    for name, d in bad.items():
        r = rows[str(d)]
        assert r["status"] == "damaged" and r["reason"].startswith(DAMAGE[name][1]), (name, r["reason"])
        assert (r["model"], r["partition"]) == ("wideresnet10_1", "iid-2"), (name, r)  # whose run it was, from the path
    assert rows[str(good[0])] | {"path": None} == dict(model="wideresnet10_1", partition="iid-2", expert=0, status="completed",
        best_val_acc=0.61, test_acc=0.58, epochs=3, duration_s=30.0, slurm_job=None, started="2026-01-02T00:00:00",
        path=None, reason=None)
    assert rows[str(good[1])]["status"] == "failed"
    assert [r["path"] for r in list_runs(root, status="completed")] == [str(good[0])]
    assert {r["path"] for r in list_runs(root, status="damaged")} == {str(d) for d in bad.values()}


def test_table_and_note_name_the_damage(runs):
    root, good, bad = runs
    rows = list_runs(root)
    table = format_runs(rows).splitlines()
    assert table[0].split()[-2:] == ["path", "reason"] and len(table) == 1 + len(rows)
    line = next(l for l in table if str(bad["metrics not json"]) in l)
    assert "damaged" in line and "metrics.json: not valid JSON" in line
    note = damaged_note(rows)
    assert "\n" not in note and note.startswith(f"expert-lab: warning: skipped {len(bad)} damaged run folders: ")
    assert damaged_note(list_runs(root, status="completed")) is None


def test_default_root_follows_the_environment(runs, monkeypatch, tmp_path):
    root, good, bad = runs
    monkeypatch.setenv("EXPERT_LAB_RUNS_DIR", str(root))
    monkeypatch.setenv("EXPERT_LAB_SETTINGS", os.devnull)
    assert len(list_runs()) == len(good) + len(bad)
    assert len(list_runs(model="resnet18")) == 1 and list_runs(partition="iid-4") == []


def test_runs_frame_skips_a_damaged_folder_by_name(tmp_path, capsys):
    good, bad = make_run(tmp_path, k=0), make_run(tmp_path, k=1)
    (bad/"metrics.json").write_text('{"status": "completed", "test_')
    runs = runs_frame(tmp_path, "wideresnet10_1", "iid")
    assert runs.expert.tolist() == [0]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipping damaged run folder {bad}: metrics.json: not valid JSON")
    assert latest_completed(runs).path.tolist() == [str(good)]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads every file")
def test_unreadable_file_is_damage(tmp_path):
    d = make_run(tmp_path/"runs")
    (d/"metrics.json").chmod(0)
    assert read_run(d)["reason"].startswith("metrics.json: cannot be read")


def test_killed_run_is_interrupted_at_its_last_saved_epoch(tmp_path):
    "A live holder makes it running; once the process is killed (no chance to write its end) it is interrupted."
    d = make_run(tmp_path/"runs", status="running", epochs=4)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from expert_lab.lock import RunLock
        with RunLock({str(d)!r}, command="test trainer"):
            print("held", flush=True); sys.stdin.read()""")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert (read_run(d)["status"], read_run(d)["epochs"]) == ("running", 4)
    finally:
        holder.send_signal(signal.SIGKILL); holder.wait(); holder.stdout.close(); holder.stdin.close()
    r = read_run(d)
    assert (r["status"], r["epochs"], r["reason"]) == ("interrupted", 4, None)
