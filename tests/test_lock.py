"""One writer per run folder (expert_lab.lock), with real processes: concurrent starts, a SIGKILLed holder, holders on
other hosts, racing takeovers and a requeued Slurm task. Children say where they are on their stdout and wait for a line
on their stdin, so every step is reached, never timed."""
import hashlib, json, os, signal, subprocess, sys, threading, time
from dataclasses import asdict
from pathlib import Path

import pytest

from expert_lab import lock
from expert_lab.lock import Holder, RunBusy, RunLock, check_free, read_holder, run_state
from conftest import HANG_S

# A trainer in miniature: wait for "go", take the folder, write its files, hold until told to release.
CHILD = r"""
import sys
from pathlib import Path
from expert_lab.lock import RunLock, RunBusy
d, name = Path(sys.argv[1]), sys.argv[2]
print("ready", flush=True); sys.stdin.readline()
try:
    lk = RunLock(d, command=f"trainer {name}"); msg = lk.acquire()
except RunBusy as e:
    print(e, file=sys.stderr); sys.exit(2)
(d/"history.csv").write_text(f"epoch,loss\n1,{name}\n"); (d/"report.html").write_text(name)
print("held", msg or "", flush=True); sys.stdin.readline()
lk.release()
"""

def start(d, name):
    return subprocess.Popen([sys.executable, "-c", CHILD, str(d), name], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

def go(procs):
    "Start the children's attempts together, once every one of them is ready."
    for p in procs: assert p.stdout.readline() == "ready\n"
    for p in procs: p.stdin.write("go\n"); p.stdin.flush()

def outcome(p):
    "'held ...' for a child that holds the folder; for one that was refused, its exit status and stderr."
    line = p.stdout.readline()
    if line.startswith("held"): return line
    return p.wait(), p.stderr.read()

def finish(p):
    p.stdin.write("release\n"); p.stdin.flush()
    assert p.wait() == 0, p.stderr.read()

def stale_far(d, age_s=3600.0):
    "A lock written by a process on another node that stopped beating `age_s` ago."
    h = Holder("node-elsewhere", 4242, "2026-12-01T09:00:00+00:00", time.time() - age_s, "expert-lab train --run-dir D", "f00d")
    (d/".lock").write_text(json.dumps(asdict(h)))
    return (d/".lock").read_bytes()


def test_two_concurrent_starts_one_refused_survivor_intact(tmp_path):
    procs = [start(tmp_path, "A"), start(tmp_path, "B")]
    go(procs)
    res = [outcome(p) for p in procs]
    held = [i for i, r in enumerate(res) if isinstance(r, str)]
    assert len(held) == 1, res
    winner, loser = procs[held[0]], procs[1 - held[0]]
    name = "AB"[held[0]]
    rc, err = res[1 - held[0]]
    assert rc == 2
    assert err.count("\n") == 1 and "is in use by" in err
    assert f"pid {winner.pid} on host {lock._HOST}" in err and f"command: trainer {name}" in err and " since " in err
    assert (tmp_path/"history.csv").read_text() == f"epoch,loss\n1,{name}\n"  # the survivor's files, untouched
    assert (tmp_path/"report.html").read_text() == name
    assert read_holder(tmp_path).pid == winner.pid
    finish(winner)
    assert read_holder(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "report.html"]  # no lock, no temporary files


def test_holder_killed_with_sigkill_is_taken_over(tmp_path):
    p = start(tmp_path, "doomed"); go([p])
    assert outcome(p).startswith("held")
    assert read_holder(tmp_path).alive()
    p.send_signal(signal.SIGKILL)
    if hasattr(os, "waitid"):  # dead but not reaped: a zombie is not a holder
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        assert not read_holder(tmp_path).alive()
    p.wait()
    lk = RunLock(tmp_path, command="expert-lab resume D")
    msg = lk.acquire()
    assert msg.startswith(f"took over run folder {tmp_path} from pid {p.pid} on host {lock._HOST}")
    assert "command: trainer doomed" in msg and "\n" not in msg
    assert read_holder(tmp_path).token == lk.token
    lk.release()
    assert read_holder(tmp_path) is None


def test_stale_lock_from_another_host_taken_over(tmp_path):
    stale_far(tmp_path)
    with RunLock(tmp_path, command="expert-lab train --run-dir D") as lk:
        assert lk.took_over.startswith(f"took over run folder {tmp_path} from pid 4242 on host node-elsewhere")
        assert read_holder(tmp_path).host == lock._HOST
    assert read_holder(tmp_path) is None


def test_live_lock_from_another_host_refused(tmp_path):
    before = stale_far(tmp_path, age_s=1.0)  # beat a second ago
    with pytest.raises(RunBusy) as e: RunLock(tmp_path).acquire()
    assert str(e.value).startswith(f"run folder {tmp_path} is in use by pid 4242 on host node-elsewhere "
                                   "since 2026-12-01T09:00:00+00:00 (command: expert-lab train --run-dir D;")
    assert (tmp_path/".lock").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
    with pytest.raises(RunBusy): check_free(tmp_path)
    assert run_state(tmp_path, "failed") == "running"


def test_racing_takeovers_exactly_one_wins(tmp_path):
    stale_far(tmp_path)
    procs = [start(tmp_path, n) for n in "ABCD"]
    go(procs)
    res = [outcome(p) for p in procs]
    held = [i for i, r in enumerate(res) if isinstance(r, str)]
    assert len(held) == 1, res
    assert "took over" in res[held[0]] and "node-elsewhere" in res[held[0]]
    assert all(r[0] == 2 and "is in use by" in r[1] for i, r in enumerate(res) if i not in held)
    assert read_holder(tmp_path).pid == procs[held[0]].pid
    finish(procs[held[0]])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lock")] == []  # no claim left behind


def test_takeover_interleavings(tmp_path):
    "The two orders in which racing takers can meet, made to happen rather than hoped for."
    dead = stale_far(tmp_path)
    a, b = RunLock(tmp_path, "A"), RunLock(tmp_path, "B")
    a.token, a.since, b.token, b.since = "aaaa", "now", "bbbb", "now"
    assert a._take_over(dead) and not b._take_over(dead)  # b judged the same record dead, too late
    assert read_holder(tmp_path).token == "aaaa"
    (tmp_path/".lock").write_bytes(dead)
    claim = tmp_path/f".lock.takeover.{hashlib.sha256(dead).hexdigest()[:16]}.0"
    claim.write_text("zzzz")
    assert not b._take_over(dead)  # another taker holds the claim right now
    os.utime(claim, (time.time() - 3600,) * 2)
    assert b._take_over(dead)  # that taker died mid-way: the next claim
    assert read_holder(tmp_path).token == "bbbb"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]  # the dead taker's claim is cleared too


def test_requeued_task_waits_for_its_predecessor(tmp_path, monkeypatch):
    "A requeued Slurm task finds its predecessor still holding; the predecessor ends while it waits."
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    p = start(tmp_path, "predecessor"); go([p])
    assert outcome(p).startswith("held")
    lk = RunLock(tmp_path, command="expert-lab resume D")
    assert lk.wait_s == lock.STALE_S + 2*lock.HEARTBEAT_S
    waits = []
    def predecessor_ends(s): waits.append(s); finish(p)
    monkeypatch.setattr(lock, "_wait", predecessor_ends)
    assert lk.acquire() is None  # released cleanly: nothing to take over
    assert len(waits) == 1
    assert read_holder(tmp_path).command == "expert-lab resume D"
    lk.release()


def test_requeued_task_takes_over_a_predecessor_killed_while_it_waits(tmp_path, monkeypatch):
    p = start(tmp_path, "predecessor"); go([p])
    assert outcome(p).startswith("held")
    def killed(s): p.kill(); p.wait()
    monkeypatch.setattr(lock, "_wait", killed)
    with RunLock(tmp_path, wait_s=600) as lk:
        assert lk.took_over.startswith(f"took over run folder {tmp_path} from pid {p.pid}")


def test_requeued_preflight_waits_too(tmp_path, monkeypatch):
    "check_free, the parent's preflight, waits as the lock would, so a requeued task is not refused before it waits."
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    p = start(tmp_path, "predecessor"); go([p])
    assert outcome(p).startswith("held")
    monkeypatch.setattr(lock, "_wait", lambda s: finish(p))
    check_free(tmp_path)
    assert read_holder(tmp_path) is None
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    stale_far(tmp_path, age_s=0.0)
    with pytest.raises(RunBusy): check_free(tmp_path)  # not requeued: refused at once


def test_bounded_wait_then_refused(tmp_path, monkeypatch):
    stale_far(tmp_path, age_s=0.0)
    waits = []
    monkeypatch.setattr(lock, "_wait", lambda s: (waits.append(s), time.sleep(s)))
    with pytest.raises(RunBusy, match="is in use by pid 4242 on host node-elsewhere"):
        RunLock(tmp_path, wait_s=0.2).acquire()
    assert waits and all(0 <= s <= 0.2 for s in waits)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert RunLock(tmp_path).wait_s == 0


def test_parent_hands_its_hold_to_the_kernel(tmp_path):
    "The CLI holds the folder and passes its token; the kernel joins instead of being refused; the parent releases."
    parent = RunLock(tmp_path, command="expert-lab train --run-dir D"); parent.acquire()
    code = ("import sys; from expert_lab.lock import RunLock; k = RunLock(sys.argv[1], join=sys.argv[2]); "
            "print(k.acquire()); k.refresh(); k.release()")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), parent.token], capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "None\n"), r.stderr
    assert read_holder(tmp_path).token == parent.token  # the kernel left it to the parent
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), "wrong"], capture_output=True, text=True)
    assert r.returncode == 1 and "RunBusy: run folder" in r.stderr
    parent.release()
    assert read_holder(tmp_path) is None


def test_kernel_stops_when_the_parent_holding_for_it_dies(tmp_path):
    p = start(tmp_path, "parent"); go([p])
    assert outcome(p).startswith("held")
    k = RunLock(tmp_path, join=read_holder(tmp_path).token)
    assert k.acquire() is None
    k.refresh()  # the parent lives: fine
    p.kill(); p.wait()
    with pytest.raises(RunBusy, match=f"no longer held for us .its lock: pid {p.pid} "): k.refresh()


def test_heartbeat_thread_refreshes(tmp_path):
    with RunLock(tmp_path, heartbeat_s=0.01, stale_s=60) as lk:
        first, beaten, refresh = read_holder(tmp_path).heartbeat, threading.Event(), lk.refresh
        lk.refresh = lambda: (refresh(), beaten.set())  # the thread looks refresh up at every beat
        assert beaten.wait(timeout=HANG_S)  # a safety net, not a duration: it beats every 10 ms
        h = read_holder(tmp_path)
        assert h.heartbeat > first and h.token == lk.token


def test_lost_hold_is_reported_and_not_removed(tmp_path):
    lk = RunLock(tmp_path); lk.acquire()
    stale_far(tmp_path, age_s=0.0)  # another node took it over while we were frozen
    with pytest.raises(RunBusy, match=r"is no longer held for us \(its lock: pid 4242 on host node-elsewhere"): lk.refresh()
    lk.release()
    assert read_holder(tmp_path).host == "node-elsewhere"


def test_run_state_and_check_free(tmp_path):
    assert [run_state(tmp_path, s) for s in ("running", "completed", "failed")] == ["interrupted", "completed", "failed"]
    check_free(tmp_path); check_free(tmp_path/"not-yet")
    with RunLock(tmp_path):
        assert run_state(tmp_path, "completed") == "running"
        with pytest.raises(RunBusy): check_free(tmp_path)
    stale_far(tmp_path)
    assert run_state(tmp_path, "running") == "interrupted"
    check_free(tmp_path)


def test_bad_input_and_missing_folder(tmp_path):
    for kw, line in [(dict(wait_s=-1), "wait_s: -1 is not allowed: a finite number of seconds >= 0"),
                     (dict(stale_s=0), "stale_s: 0 is not allowed: a finite number of seconds > 0"),
                     (dict(heartbeat_s="5"), "heartbeat_s: '5' is not allowed"),
                     (dict(heartbeat_s=300), "heartbeat_s: 300 is not allowed: less than stale_s")]:
        with pytest.raises(ValueError, match=line): RunLock(tmp_path, **kw)
    with pytest.raises(FileNotFoundError, match="does not exist"): RunLock(tmp_path/"missing").acquire()
    assert not (tmp_path/"missing").exists()
    assert list(tmp_path.iterdir()) == []


def test_damaged_lock_file_is_taken_over(tmp_path):
    (tmp_path/".lock").write_text('{"host": "node-elsewhere", "pi')  # a full disk cut it short
    os.utime(tmp_path/".lock", (time.time() - 60,) * 2)
    assert read_holder(tmp_path).pid == 0
    with RunLock(tmp_path) as lk: assert lk.took_over.startswith(f"took over run folder {tmp_path} from a damaged lock file")


def test_create_without_hard_links_and_with_a_lost_nfs_reply(tmp_path, monkeypatch):
    real_link = os.link
    def no_links(src, dst): raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_links)  # some FUSE and SMB mounts: create-exclusive instead
    with RunLock(tmp_path, command="A") as lk:
        assert read_holder(tmp_path).token == lk.token
        with pytest.raises(RunBusy): RunLock(tmp_path).acquire()
    def lost_reply(src, dst): real_link(src, dst); raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "link", lost_reply)  # NFS: the link was made, the reply was lost
    with RunLock(tmp_path, command="B") as lk:
        assert read_holder(tmp_path).command == "B"
        with pytest.raises(RunBusy): RunLock(tmp_path).acquire()  # a real "exists" still refuses
    assert sorted(p.name for p in tmp_path.iterdir()) == []
