"""`expert-lab lab` as a user runs it: a port that is taken moves the lab to the next free one, and the printed URL names
the port it really got; a port outside 1..65535 is one line. (Replaces `test_expert_lab_lab` in tests/test_browser.py.)"""
from __future__ import annotations
import json, os, selectors, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

from expert_lab.config import project_root
from expert_lab.lab import KERNEL_NAME
from conftest import HANG_S

ROOT = project_root()
EXE = Path(sys.executable).with_name("expert-lab")


def _cmd(*args) -> list[str]:
    return [str(EXE), *args] if EXE.exists() else [sys.executable, "-c", "import sys; from expert_lab.cli import main; sys.exit(main())", *args]


def _env(tmp: Path) -> dict:
    "Nothing read from or written to the user's Jupyter set-up; runs go under `tmp`."
    return {**os.environ, "EXPERT_LAB_ROOT": str(ROOT), "EXPERT_LAB_RUNS_DIR": str(tmp/"runs"),
            "JUPYTER_CONFIG_DIR": str(tmp/"jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp/"jupyter-runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(tmp/"lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp/"lab-workspaces"),
            "IPYTHONDIR": str(tmp/"ipython")}


def _read_url(proc: subprocess.Popen, timeout_s: float = HANG_S) -> str:
    "Read the lab's stdout until it prints its URL (the line it prints once the server says where it listens)."
    sel, deadline, out = selectors.DefaultSelector(), time.monotonic() + timeout_s, b""
    sel.register(proc.stdout, selectors.EVENT_READ)
    while time.monotonic() < deadline:
        if not sel.select(deadline - time.monotonic()): break
        chunk = os.read(proc.stdout.fileno(), 4096)  # raw reads: a buffered readline could hide a line from select
        if not chunk: pytest.fail(f"expert-lab lab exited ({proc.wait()}) without printing a URL:\n{out.decode()}")
        out += chunk
        url = next((w for w in out.decode().split() if w.startswith("http://")), None)
        if url and out.endswith(b"\n"): return url
    pytest.fail(f"no URL within {timeout_s} s:\n{out.decode()}")


def _get(url: str):
    with urllib.request.urlopen(url, timeout=HANG_S) as r: return r.geturl(), r.read()


def test_lab_moves_to_a_free_port_and_prints_it(tmp_path):
    "Port taken: Jupyter picks another, the printed URL names it, and the lab answers there with our kernel."
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0)); busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen(_cmd("lab", "--port", str(port), "--no-browser"), env=_env(tmp_path), cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=open(tmp_path/"lab.log", "w"), stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own group: Ctrl-C reaches all of it, as in a terminal
        try:
            url = _read_url(proc)
            got = int(url.split("/")[2].rsplit(":", 1)[1])
            assert got != port and url.startswith(f"http://127.0.0.1:{got}/lab/tree/nbs?token="), url
            base, token = f"http://127.0.0.1:{got}", url.split("token=")[1]
            assert json.loads(_get(f"{base}/api/kernelspecs?token={token}")[1])["default"] == KERNEL_NAME
            names = {c["name"] for c in json.loads(_get(f"{base}/api/contents?token={token}")[1])["content"]}
            assert {"nbs", "settings.ini"} <= names, f"serves {sorted(names)}, not the project root {ROOT}"
            assert _get(f"{base}/?token={token}")[0].startswith(f"{base}/lab/tree/nbs")  # / opens the lab at nbs/
            assert _get(url)[0].startswith(f"{base}/lab/tree/nbs")
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(HANG_S) == 0, (tmp_path/"lab.log").read_text()
        finally:
            if proc.poll() is None: os.killpg(proc.pid, signal.SIGTERM); proc.wait(HANG_S)
            proc.stdout.close()


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_lab_port_out_of_range_is_one_line(tmp_path, port):
    r = subprocess.run(_cmd("lab", f"--port={port}", "--no-browser"), env=_env(tmp_path), cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 2, r
    assert r.stdout == "" and r.stderr.splitlines() == [f"expert-lab: error: port: must be an integer in 1..65535, got {port}"], r.stderr
    assert list(tmp_path.iterdir()) == []
