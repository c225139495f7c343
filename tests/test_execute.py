"""The console pipe between a kernel and `expert-lab train`: lines arrive in order, and a parent that dies mid-run never
turns the run's own outcome into an error (a broken pipe is the parent's loss, not the run's)."""
import os
from pathlib import Path

from expert_lab.execute import Console
from expert_lab.notebook_run import console_tee


def test_lines_arrive_in_order(tmp_path):
    got = []
    con = Console(tmp_path, got.append)
    with console_tee(con.path):
        for k in range(3): print(f"epoch {k}")
    con.close()
    assert got == ["epoch 0", "epoch 1", "epoch 2"]


def test_a_reader_that_died_is_no_error(tmp_path, capsys):
    fifo = tmp_path/"console"; os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    with console_tee(fifo):
        print("one")
        os.close(reader)  # the parent is gone
        print("two"); print("three")
    assert capsys.readouterr().out.splitlines() == ["one", "two", "three"], "the report still gets every line"


def test_forward_signals_is_the_one_guard_and_passes_each_signal_on(monkeypatch):
    "A SIGTERM to `expert-lab` reaches the kernels it started; the command's exit status says which signal came."
    import signal, subprocess, sys, time
    from conftest import HANG_S
    from expert_lab import execute
    from expert_lab.signals import SignalGuard
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\nprint('ready', flush=True)\ntime.sleep(600)"
    kernel = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert kernel.stdout.readline().strip() == "ready"
    monkeypatch.setattr(execute, "_kernel_pids", lambda: [kernel.pid])  # stands in for a kernel this process started
    before = signal.getsignal(signal.SIGTERM)
    with execute.forward_signals() as fw:
        os.kill(os.getpid(), signal.SIGTERM)
        end = time.monotonic() + HANG_S
        while not fw.received and time.monotonic() < end: time.sleep(0.01)
    assert kernel.wait(timeout=HANG_S) == 7, "the kernel got the SIGTERM"
    assert isinstance(fw, SignalGuard) and (fw.received, fw.exit_status) == (["SIGTERM"], 143)
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"
