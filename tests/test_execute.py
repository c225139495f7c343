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
