"""Fixtures shared by the test files: an isolated environment and `expert-lab` runner for command-line tests, one CPU
thread for tiny models, and the seconds-long training config most engine tests start from."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a hang guard, never a duration: long enough for a 2-core machine that something else keeps busy
HANG_S = 600
# variables a developer's shell may set that would change what a command resolves to
CONFIG_ENV = ("MODEL_TYPE", "EXPERT_ID", "EPOCHS", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def isolated_env(tmp:Path, **extra)->dict:
    "os.environ without config variables, with settings, runs and data pointed into `tmp`."
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_ENV and not k.startswith("EXPERT_LAB_")}
    # no settings file is no site settings (/dev/null): EXPERT_LAB_SETTINGS naming a missing file is an error
    env.update(EXPERT_LAB_SETTINGS=str(tmp/"settings.ini") if (tmp/"settings.ini").exists() else os.devnull, EXPERT_LAB_RUNS_DIR=str(tmp/"runs"),
               EXPERT_LAB_DATA_ROOT=str(tmp/"data"), EXPERT_LAB_DEVICE="cpu", MPLBACKEND="Agg")
    return env | extra


def run_cli(tmp:Path, *args, env:dict|None=None, timeout:int=300)->subprocess.CompletedProcess:
    "Run `expert-lab ARGS` from the repo root in the isolated environment of `tmp`."
    return subprocess.run([str(BIN/"expert-lab"), *map(str, args)], cwd=REPO, env=env or isolated_env(tmp),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def clean_env():
    "`clean_env(tmp, **extra)`: an environment whose settings, runs and data live under `tmp`."
    return isolated_env


@pytest.fixture
def cli():
    "`cli(tmp, *args, env=None, timeout=300)`: run the venv's `expert-lab` in `clean_env(tmp)`."
    return run_cli


@pytest.fixture
def one_thread():
    "Tiny models train faster on one thread, and much faster on a shared, busy 2-core machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    "A seconds-long digits run: tiny wide ResNet, few steps, deterministic, on the CPU; `kw` overrides any field."
    from expert_lab.config import TrainConfig
    base = dict(model="wideresnet10_1", dataset="digits", n_experts=1, partition="iid", device="cpu", epochs=3,
                batch_size=32, lr=0.05, steps_per_epoch=4, channels_last=False, hflip=False, drop_rate=0.0,
                restart_period=2, deterministic=True)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def tiny():
    "`tiny(**overrides)`: the config of a seconds-long digits run (see `tiny_config`)."
    return tiny_config


@pytest.fixture(scope="module")
def slurm():
    "A Slurm that answers; skipped only where none is installed and TEST_REQUIRE_SLURM is unset."
    if not shutil.which("sinfo"):
        msg = "Slurm is not installed (no sinfo on PATH); start one with: tools/slurm.sh start"
        if os.environ.get("TEST_REQUIRE_SLURM"): pytest.fail(msg + " (TEST_REQUIRE_SLURM is set)")
        pytest.skip(msg)
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=60)
    if r.returncode or not r.stdout.strip():
        pytest.fail(f"sinfo is installed but Slurm does not answer ({r.stderr.strip()}); run tools/slurm.sh start")


SLURM_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def wait_slurm(job_ids, timeout=HANG_S):
    "Poll sacct until every job is in a final state (what a Slurm test waits on); return {job_id: state}."
    import time
    from expert_lab.slurm import slurm_states
    end = time.time() + timeout
    while time.time() < end:
        states = slurm_states(job_ids)
        if all(s in SLURM_FINAL for s in states.values()): return states
        time.sleep(1)
    raise AssertionError(f"jobs not finished after {timeout}s: {states}")
