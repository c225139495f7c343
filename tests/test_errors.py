"""Every subcommand against bad input and damaged run folders: one line naming what was wrong, the right exit status
(2 for bad input, 1 for a failure the user did not type), no traceback, and nothing created or changed on disk.

Each case runs the real `expert-lab` executable with its project root, settings, runs and data pointed into a fresh
tmp folder (EXPERT_LAB_ROOT, EXPERT_LAB_SETTINGS, EXPERT_LAB_RUNS_DIR, EXPERT_LAB_DATA_ROOT) that holds no runbooks, so
that no case can train or start a kernel: every one must stop before that."""
from __future__ import annotations
import os, shutil, subprocess, sys
from pathlib import Path

import pytest

from test_catalog import make_run
from conftest import HANG_S

pytestmark = pytest.mark.slow  # ~30 short processes; no training, no kernels
EXE = Path(sys.executable).with_name("expert-lab")
_CONFIG_ENV = ("MODEL_TYPE", "EXPERT_ID", "EPOCHS", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _CONFIG_ENV and not k.startswith(("EXPERT_LAB_", "JUPYTER"))}
    p = tmp/"project"
    return env | dict(EXPERT_LAB_ROOT=str(p), EXPERT_LAB_SETTINGS=str(p/"settings.ini") if (p/"settings.ini").exists() else os.devnull, EXPERT_LAB_RUNS_DIR=str(p/"runs"),
                      EXPERT_LAB_DATA_ROOT=str(p/"data"), EXPERT_LAB_DEVICE="cpu", JUPYTER_CONFIG_DIR=str(tmp/"jupyter"),
                      JUPYTER_RUNTIME_DIR=str(tmp/"jupyter"/"runtime"), IPYTHONDIR=str(tmp/"ipython"), MPLBACKEND="Agg")


def _tree(root: Path) -> dict:
    "Every path under `root` with its size and modification time: what a case must leave as it found it."
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# --- what each case puts in the project before it runs -----------------------------------------------------------------

def _settings(text):
    def setup(p): (p/"settings.ini").write_text(text)
    return setup

def _damaged_run(p, k=0, damage="metrics"):
    d = make_run(p/"runs", k=k, stamp=f"damaged-{damage}")
    shutil.rmtree(d/"checkpoints")  # no weights yet: the folder's only fault is the damaged file
    if damage == "metrics": (d/"metrics.json").write_text('{"status": "completed", "test_a')
    if damage == "config": (d/"config.json").write_text("")
    return d

def _runs_with_damage(p):
    make_run(p/"runs", k=0, stamp="good", status="failed"); _damaged_run(p, k=1)

_DMG = "runs/wideresnet10_1/iid-2/expert-0/damaged-metrics"  # the folder `_damaged_run` makes
_DMG_CONFIG = "runs/wideresnet10_1/iid-2/expert-0/damaged-config"

# id: (arguments, setup, exit status, text (or texts) the output must contain)
CASES = {
    "config bad value": (["config", "--lr", "abc"], None, 2, "lr"),
    "config unknown option": (["config", "--lrr", "0.1"], None, 2, "--lrr"),
    "config settings not ini": (["config"], _settings("lr = 0.1\n"), 2, "settings.ini"),
    "config settings unknown key": (["config"], _settings("[training]\nlearning_rate = 0.1\n"), 2, "learning_rate"),
    "models extra argument": (["models", "extra"], None, 2, "extra"),
    "models unknown option": (["models", "--bogus"], None, 2, "--bogus"),
    "train unknown model": (["train", "--model", "nosuch", "--dataset", "digits"], None, 2, "nosuch"),
    "train negative epochs": (["train", "--epochs", "-1", "--dataset", "digits"], None, 2, "epochs"),
    "train expert out of range": (["train", "--n-experts", "2", "--expert-id", "5", "--dataset", "digits"], None, 2, "expert_id"),
    "train parallel zero": (["train", "--parallel", "0", "--dataset", "digits"], None, 2, "parallel"),
    "train unknown executor": (["train", "--executor", "pbs", "--dataset", "digits"], None, 2, "pbs"),
    "train run dir for many": (["train", "--run-dir", "somewhere", "--dataset", "digits"], None, 2, "run_dir"),
    "train folder dataset missing": (["train", "--dataset", "folder", "--data-root", "nothere", "--expert-id", "0"], None, 2, "nothere"),
    "train into damaged folder": (["train", "--run-dir", _DMG, "--expert-id", "0", "--dataset", "digits"], _damaged_run, 2, "metrics.json"),
    "runs lists damage": (["runs"], _runs_with_damage, 0, "metrics.json: not valid JSON"),
    "runs unknown status": (["runs", "--status", "bogus"], None, 2, "bogus"),
    "compare unknown status": (["compare", "--status", "bogus"], None, 2, "bogus"),
    "compare damaged, no runbook": (["compare"], _runs_with_damage, 1, ("compare_runs", "skipped 1 damaged run folder")),
    "ensemble without model": (["ensemble", "--partition", "iid"], None, 2, "--model"),
    "ensemble n experts text": (["ensemble", "--model", "wideresnet10_1", "--partition", "iid", "--n-experts", "two"], None, 2, "two"),
    "ensemble only damaged runs": (["ensemble", "--model", "wideresnet10_1", "--partition", "iid"], _damaged_run, 2, ("no completed runs", "skipped 1 damaged run folder")),
    "resume missing folder": (["resume", "nothere"], None, 2, "nothere"),
    "resume a file": (["resume", "settings.ini"], _settings("[training]\n"), 2, "settings.ini"),
    "resume damaged config": (["resume", _DMG_CONFIG], lambda p: _damaged_run(p, damage="config"), 2, "config.json"),
    "resume damaged metrics": (["resume", _DMG], _damaged_run, 2, "metrics.json"),
    "distill without experts": (["distill", "--model", "wideresnet10_1", "--partition", "iid"], None, 2, "no completed experts"),
    "distill unknown student": (["distill", "--model", "wideresnet10_1", "--partition", "iid", "--student", "nosuch"], None, 2, "nosuch"),
    "distill without partition": (["distill", "--model", "wideresnet10_1"], None, 2, "--partition"),
    "lab port too high": (["lab", "--port", "99999", "--no-browser"], None, 2, "99999"),
    "lab port text": (["lab", "--port", "http", "--no-browser"], None, 2, "http"),
    "lab extra argument": (["lab", "now"], None, 2, "now"),
}


@pytest.mark.parametrize("args,setup,status,says", CASES.values(), ids=CASES.keys())
def test_one_line_no_traceback_nothing_created(tmp_path, args, setup, status, says):
    project = tmp_path/"project"; project.mkdir()
    if setup: setup(project)
    before = _tree(tmp_path)
    r = subprocess.run([str(EXE), *args], cwd=project, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_S)
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == status, f"exit {r.returncode}, expected {status}:\n{out}"
    for text in (says if isinstance(says, tuple) else (says,)): assert text in out, f"{text!r} not in:\n{out}"
    if status: assert len(out.splitlines()) <= 2 and r.stdout == "", f"more than one line (and a warning):\n{out}"
    else: assert r.stderr == "", r.stderr
    assert _tree(tmp_path) == before, "the command created or changed files"
