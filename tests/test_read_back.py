"""Every value read back is checked like a value typed (issue 23): settings files, EXPERT_LAB_SETTINGS, non-finite
numbers and empty folders from every door, devices this machine cannot reach, schedule checks of any size, and a run's
config.json on resume. Each refusal is one line, exit status 2, no traceback, and nothing created or changed.

The command-line cases run the real `expert-lab` (see conftest.run_cli) with settings, runs and data in pytest's tmp
folder; none of them trains or starts a kernel."""
from __future__ import annotations
import hashlib, json, os
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import CONFIG_ENV, isolated_env, run_cli
from test_catalog import make_run

NO_MPS = pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
CLI = pytest.mark.slow  # each runs `expert-lab` in a new process (2-4 s on a busy 2-core machine; ~40 of them)


def _env(tmp: Path, settings: str | bytes | None = None, **extra) -> dict:
    "The isolated environment, reading `settings` (text or raw bytes) from tmp/settings.ini, or no settings at all."
    if settings is None: return isolated_env(tmp, EXPERT_LAB_SETTINGS=os.devnull, **extra)
    p = tmp/"settings.ini"
    p.write_bytes(settings if isinstance(settings, bytes) else settings.encode())
    return isolated_env(tmp, **extra)


def _refused(r, *says):
    "Exit 2, one line on stderr, no traceback, naming each of `says`."
    out = r.stdout + r.stderr
    assert r.returncode == 2, f"exit {r.returncode}:\n{out}"
    assert "Traceback" not in out and r.stdout == "" and len(r.stderr.splitlines()) == 1, out
    for s in says: assert s in r.stderr, f"{s!r} not in:\n{r.stderr}"
    return r.stderr


def _tree(root: Path) -> dict:
    "Every file under `root` with a hash of its bytes (folders too): what a refused command must leave as it was."
    return {str(p.relative_to(root)): p.is_dir() or hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


# --- settings files ---------------------------------------------------------------------------------------------------

@CLI
@pytest.mark.parametrize("cmd", [["config"], ["runs"]])
def test_percent_is_an_ordinary_character(tmp_path, cmd):
    r = run_cli(tmp_path, *cmd, env=_env(tmp_path, "[tracking]\nwandb_project = 100%-test\n"))
    assert r.returncode == 0, r.stderr
    if cmd == ["config"]: assert "'100%-test'" in r.stdout and "settings" in r.stdout.split("'100%-test'")[1].splitlines()[0]


@CLI
def test_settings_not_utf8_names_file_and_line(tmp_path):
    env = _env(tmp_path, b"[paths]\n# caf\xc3\xa9 in UTF-8 is fine\n[tracking]\nwandb_project = caf\xe9 in latin-1\n")
    _refused(run_cli(tmp_path, "config", env=env), f"{tmp_path/'settings.ini'}, line 4: not UTF-8 text (byte 0xe9)")


@CLI
def test_unknown_section_names_file_section_and_allowed(tmp_path):
    _refused(run_cli(tmp_path, "config", env=_env(tmp_path, "[trainig]\nepochs = 3\n")),
             f"{tmp_path/'settings.ini'}: unknown section [trainig] (did you mean 'training'?)", "[paths], [training], [tracking], [slurm]")


@CLI
@pytest.mark.parametrize("text,says", [("[training]\nlearning_rate = 0.1\n", "[training]: unknown key 'learning_rate'"),
                                       ("[slurm]\nmemory_gb = 4\n", "[slurm]: unknown key 'memory_gb' (did you mean 'mem_gb'?)")])
def test_unknown_key_names_the_file(tmp_path, text, says):
    _refused(run_cli(tmp_path, "config", env=_env(tmp_path, text)), f"{tmp_path/'settings.ini'}: {says}")


def test_slurm_keys_are_the_slurm_resources():
    "The [slurm] keys settings files may hold are exactly what the Slurm executor reads."
    from expert_lab.config import SLURM_KEYS
    from expert_lab.slurm import SlurmResources
    assert SLURM_KEYS == tuple(f.name for f in fields(SlurmResources))


def test_slurm_section_read_without_interpolation(tmp_path):
    from expert_lab.config import read_settings
    from expert_lab.slurm import slurm_resources
    (tmp_path/"s.ini").write_text("[slurm]\naccount = lab-100%\nmem_gb = 8\n")
    res = slurm_resources(read_settings(tmp_path/"s.ini"))
    assert (res.account, res.mem_gb) == ("lab-100%", 8)


@CLI
@pytest.mark.parametrize("what,cmd", [("missing", ["config"]), ("missing", ["runs"]), ("missing", ["train", "--dataset", "digits", "--dry-run"]),
                                      ("folder", ["config"]), ("unreadable", ["config"])])
def test_settings_variable_must_name_a_readable_file(tmp_path, what, cmd):
    target = tmp_path/"site.ini"
    if what == "folder": target.mkdir()
    if what == "unreadable":
        if os.geteuid() == 0: pytest.skip("root reads any file")
        target.write_text("[training]\n"); target.chmod(0)
    before = _tree(tmp_path)
    says = {"missing": "does not exist", "folder": "is a folder", "unreadable": "cannot be read"}[what]
    _refused(run_cli(tmp_path, *cmd, env=isolated_env(tmp_path, EXPERT_LAB_SETTINGS=str(target))),
             f"environment variable EXPERT_LAB_SETTINGS: {target} {says}")
    assert _tree(tmp_path) == before


@CLI
def test_empty_settings_variable_means_unset(tmp_path):
    "EXPERT_LAB_SETTINGS='' reads the project root's settings.ini (here a tmp project's)."
    (tmp_path/"settings.ini").write_text("[training]\nepochs = 7\n")
    r = run_cli(tmp_path, "config", env=isolated_env(tmp_path, EXPERT_LAB_SETTINGS="", EXPERT_LAB_ROOT=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert any(l.split()[:3] == ["epochs", "7", "settings"] for l in r.stdout.splitlines()), r.stdout


@CLI
def test_relative_folders_resolve_against_the_settings_file(tmp_path):
    site = tmp_path/"site"; site.mkdir()
    (site/"settings.ini").write_text("[paths]\nruns_dir = myruns\ndata_root = ../data\n")
    env = {k: v for k, v in isolated_env(tmp_path, EXPERT_LAB_SETTINGS=str(site/"settings.ini")).items()
           if k not in ("EXPERT_LAB_RUNS_DIR", "EXPERT_LAB_DATA_ROOT")}
    r = run_cli(tmp_path, "config", env=env)
    assert r.returncode == 0, r.stderr
    rows = {l.split()[0]: l.split()[1:] for l in r.stdout.splitlines()}
    assert rows["runs_dir"] == [repr(str(site/"myruns")), "settings"], rows["runs_dir"]
    assert rows["data_root"] == [repr(str(site/"../data")), "settings"], rows["data_root"]
    # the same relative path from the environment still resolves against the project root
    r = run_cli(tmp_path, "config", env=env | {"EXPERT_LAB_RUNS_DIR": "envruns"})
    assert r.stdout.count(repr(str(Path(__file__).resolve().parents[1]/"envruns"))) == 1, r.stdout


# --- values through every door ----------------------------------------------------------------------------------------

@CLI
@pytest.mark.parametrize("door,key,value", [("flag", "lr", "nan"), ("flag", "momentum", "-inf"), ("env", "min_lr", "inf"),
                                            ("settings", "dirichlet_alpha", "NaN")])  # every float key: 00_config's coerce tests
def test_non_finite_numbers_refused(tmp_path, door, key, value):
    flag = [f"--{key.replace('_', '-')}={value}"] if door == "flag" else []  # = : argparse would take -inf for an option
    env = _env(tmp_path, f"[training]\n{key} = {value}\n") if door == "settings" else \
        _env(tmp_path, **({f"EXPERT_LAB_{key.upper()}": value} if door == "env" else {}))
    before = _tree(tmp_path)
    _refused(run_cli(tmp_path, "train", "--dataset", "digits", "--dry-run", *flag, env=env), f"{key}: must be a finite number")
    assert _tree(tmp_path) == before, "nothing created"


@pytest.mark.parametrize("params", [dict(lr=float("nan")), dict(ema_decay=float("inf")), dict(runs_dir=""), dict(device="mps")])
def test_papermill_door_refuses_before_a_folder(tmp_path, monkeypatch, params):
    "What `papermill -p` hands the training notebook goes through the same checks (open_notebook_run -> resolve_run, preflight)."
    if params.get("device") == "mps" and torch.backends.mps.is_available(): pytest.skip("this machine has an MPS device")
    from expert_lab.config import ConfigError
    from expert_lab.notebook_run import open_notebook_run
    for k in [k for k in os.environ if k in CONFIG_ENV or k.startswith("EXPERT_LAB_")]: monkeypatch.delenv(k)
    for k, v in _env(tmp_path).items(): monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=f"{next(iter(params))}: "): open_notebook_run(dict(dataset="digits", smoke=False, resume=True, **params))
    assert not (tmp_path/"runs").exists()


@CLI
@pytest.mark.parametrize("flag,cmd", [("--runs-dir", ["config"]), ("--runs-dir", ["train", "--dataset", "digits", "--dry-run"]),
                                      ("--data-root", ["train", "--dataset", "digits", "--dry-run"])])
def test_empty_folder_flag_refused(tmp_path, flag, cmd):
    key = flag[2:].replace("-", "_")
    _refused(run_cli(tmp_path, *cmd, flag, "", env=_env(tmp_path)), f"{key}: must not be empty")


@CLI
def test_empty_folder_in_env_or_settings_means_unset(tmp_path):
    r = run_cli(tmp_path, "config", env=_env(tmp_path, "[paths]\nruns_dir =\n", EXPERT_LAB_RUNS_DIR="", EXPERT_LAB_ROOT=str(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert [l.split()[1:] for l in r.stdout.splitlines() if l.startswith("runs_dir ")] == [[repr(str(tmp_path/"runs")), "default"]]


@CLI
@NO_MPS
@pytest.mark.parametrize("cmd", [["config"], ["train", "--dataset", "digits", "--dry-run", "--executor", "slurm"]])
def test_mps_refused_without_mps(tmp_path, cmd):
    before = _tree(tmp_path)
    _refused(run_cli(tmp_path, *cmd, "--device", "mps", env=_env(tmp_path)), "device: 'mps' asked for, but this machine has no Apple MPS device")
    assert _tree(tmp_path) == before


# --- checks of any size -----------------------------------------------------------------------------------------------

@CLI
def test_huge_schedule_is_checked_at_once(tmp_path):
    "The command of issue 23 (14 s and 4.5 GB before): now a plain dry run."
    r = run_cli(tmp_path, "train", "--dataset", "digits", "--model", "wideresnet10_1", "--expert-id", "0", "--epochs", "100000000",
                "--restart-period", "1", "--dry-run", env=_env(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "would train wideresnet10_1 expert 0" in r.stdout


@pytest.mark.parametrize("epochs", [10**9, 10**18, 10**18 + 1])
@pytest.mark.parametrize("mult", [1, 2])
def test_schedule_warning_any_size(epochs, mult):
    from expert_lab.config import TrainConfig, schedule_warning
    w = schedule_warning(TrainConfig(epochs=epochs, restart_period=1, restart_mult=mult))
    assert w is None if mult == 1 else f"epochs={epochs} ends inside" in w


# --- a run's config.json, read back on resume -------------------------------------------------------------------------

def _edit(key=None, value=None, text=None):
    def edit(d):
        p = d/"config.json"
        if text is not None: p.write_text(text); return
        j = json.loads(p.read_text()); j["config"][key] = value
        p.write_text(json.dumps(j))  # NaN is written as the bare NaN that Python's json reads back
    return edit

RESUME_CASES = {
    "lr negative": (_edit("lr", -1), "config.json: lr: must be > 0, got -1"),
    "epochs text": (_edit("epochs", "abc"), "config.json: epochs: expected an integer, got 'abc'"),
    "lr nan": (_edit("lr", float("nan")), "config.json: lr: must be a finite number, got nan"),
    "runs_dir empty": (_edit("runs_dir", ""), "config.json: runs_dir: must not be empty"),
    "not an object": (_edit(text="[1, 2]"), "is damaged (config.json: not a JSON object"),  # the damage check (catalog.read_run) says it first
    "no config": (_edit(text='{"sources": {}}'), "config.json: not a run config"),
    "config not an object": (_edit(text='{"config": 3}'), 'config.json: "config" must be a JSON object, got int'),
}


@CLI
@pytest.mark.parametrize("edit,says", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resume_refuses_an_edited_config_and_changes_nothing(tmp_path, edit, says):
    d = make_run(tmp_path/"runs", status="completed")
    edit(d)
    before = _tree(tmp_path)
    _refused(run_cli(tmp_path, "resume", d, env=_env(tmp_path)), f"{d}/{says}" if says.startswith("config.json") else says)
    assert _tree(tmp_path) == before, "every file in the run folder stays byte-identical"
