"""The `expert-lab` command as a user types it: bad input is refused with one line and exit status 2 before anything is
created, and the seed project's spellings (`--expert_id`, `--batch_size`, `--no_wandb`, MODEL_TYPE/EXPERT_ID/EPOCHS) work.

Every command runs as a subprocess of the venv's `expert-lab`, with settings, runs and data isolated in a tmp folder."""
import os, subprocess, sys
from pathlib import Path

import pytest

from conftest import HANG_S, CONFIG_ENV as _CONFIG_ENV, isolated_env as clean_env, run_cli as cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
def files_under(p:Path)->list:
    return sorted(str(f.relative_to(p)) for f in p.rglob("*")) if p.exists() else []


TRAIN = ("train", "--model", "wideresnet10_1", "--dataset", "cifar100", "--n-experts", "2", "--epochs", "1",
         "--steps-per-epoch", "2")

BAD_INPUT = {  # name: (extra arguments, extra environment, words the one-line error must contain)
    "unknown model": (("--model", "resnet19"), {}, ("model", "resnet19", "did you mean 'resnet18'")),
    "expert id too large": (("--expert-id", "2"), {}, ("expert_id", "0..1", "2")),
    "expert id spelled the seed's way": (("--expert_id", "7"), {}, ("expert_id", "7")),
    "expert id from the environment": ((), {"EXPERT_ID": "5"}, ("expert_id", "5")),
    "epochs not an integer": (("--epochs", "ten"), {}, ("epochs", "integer", "'ten'")),
    "lr not a number": (("--lr", "fast"), {}, ("lr", "number", "'fast'")),
    "bool not a bool": (("--nesterov", "maybe"), {}, ("nesterov", "true or false")),
    "epochs out of range": (("--epochs", "0"), {}, ("epochs", "> 0")),
    "unknown partition": (("--partition", "random"), {}, ("partition", "'random'", "iid")),
    "unknown option": (("--learning-rate", "0.1"), {}, ("unknown option --learning-rate",)),
    "bad environment variable": ((), {"EXPERT_LAB_EPOCHZ": "3"}, ("EXPERT_LAB_EPOCHZ", "epochz")),
    "superclass needs cifar100": (("--dataset", "cifar10", "--partition", "superclass"), {}, ("superclass", "cifar100")),
    "a tuning trial's key": (("--study", "s1"), {}, ("option --study does not apply to this command", "the tuner sets it")),
}


def check_refused(rc:int, out:str, err:str, words, tmp:Path):
    "Exit status 2, one `expert-lab: error:` line naming `words`, nothing on stdout, nothing created."
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expert-lab: error: "), err
    for w in words: assert w in lines[0], (w, lines[0])
    assert out == ""
    assert files_under(tmp/"runs") == [], "bad input must not create a run folder"
    assert not (tmp/"data").exists(), "bad input must not touch the data"


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_refused(tmp_path, monkeypatch, capsys, name):
    "In-process through `main`, so every case is cheap; the subprocess test below checks the real entry point."
    from expert_lab.cli import main
    args, env, words = BAD_INPUT[name]
    for k in list(os.environ): monkeypatch.delenv(k) if k in _CONFIG_ENV or k.startswith("EXPERT_LAB_") else None
    for k, v in clean_env(tmp_path, **env).items(): monkeypatch.setenv(k, v)
    rc = main([*TRAIN, "--runs-dir", str(tmp_path/"runs"), *args])
    check_refused(rc, *capsys.readouterr(), words, tmp_path)


@pytest.mark.parametrize("name", ["unknown model", "expert id too large", "epochs not an integer", "a tuning trial's key"])
def test_bad_input_exits_2_from_the_command(tmp_path, name):
    args, env, words = BAD_INPUT[name]
    r = cli(tmp_path, *TRAIN, "--runs-dir", tmp_path/"runs", *args, env=clean_env(tmp_path, **env))
    check_refused(r.returncode, r.stdout, r.stderr, words, tmp_path)


@pytest.mark.parametrize("args, words", [
    (("resume", "NOT_A_RUN"), ("run_dir", "not a run folder")),
    (("ensemble", "--partition", "iid"), ("--model",)),
    (("ensemble", "--model", "wideresnet10_1", "--partition", "iid", "--n-experts", "two"), ("--n-experts", "'two'")),
    (("frobnicate",), ("frobnicate",)),
])
def test_other_commands_refuse_bad_input(tmp_path, args, words):
    args = [str(tmp_path/a) if a == "NOT_A_RUN" else a for a in args]
    r = cli(tmp_path, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expert-lab: error: "), r.stderr
    for w in words: assert w in lines[0], (w, lines[0])
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("cmd", [["config"], ["distill", "--model", "wideresnet10_1", "--partition", "iid"]])
@pytest.mark.parametrize("flag", ["--study", "--trial"])
def test_only_the_tuner_sets_a_trials_keys(tmp_path, monkeypatch, capsys, cmd, flag):
    "`study` and `trial` (config.TRIAL_KEYS) are no flag of `train`, `config` or `distill` (train: in BAD_INPUT)."
    from expert_lab.cli import main
    isolate(monkeypatch, tmp_path)
    rc = main([*cmd, flag, "3", "--dataset", "digits"])
    check_refused(rc, *capsys.readouterr(), (f"option {flag} does not apply", "the tuner sets it"), tmp_path)


def test_train_and_tune_share_one_flag_per_config_key():
    "One flag layer (`expert_lab.flags`): `tune` offers the config keys `train` does, spelt the same, and the same Slurm flags."
    pytest.importorskip("expert_lab.tune", reason="expert_lab.tune (the tuner) is not written yet")
    from expert_lab import cli, tune
    def options(p, title):
        return {o for g in p._action_groups if g.title.startswith(title) for a in g._group_actions for o in a.option_strings}
    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]
    assert options(tune.build_parser(), "training keys") == options(train, "config keys")
    assert options(tune.build_parser(), "slurm") == options(train, "slurm") - {"--array-parallelism"}  # tune: --workers


def test_the_flag_layer_loads_no_torch():
    code = "import sys, expert_lab.flags; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_S)
    assert r.stdout.split() == ["False"], r.stdout + r.stderr


def config_rows(out:str)->dict:
    "`expert-lab config` output as {key: (value, source)}."
    rows = {}
    for line in out.splitlines():
        key, rest = line.split(None, 1)
        value, source = rest.rsplit(None, 1)
        rows[key] = (value, source)
    return rows


def test_seed_spellings_reach_the_config(tmp_path):
    r = cli(tmp_path, "config", "--expert_id", "1", "--n_experts", "2", "--batch_size", "32", "--no_wandb", "--wandb_mode", "disabled")
    assert r.returncode == 0, r.stderr
    rows = config_rows(r.stdout)
    assert rows["expert_id"] == ("1", "arg") and rows["batch_size"] == ("32", "arg")
    assert rows["wandb"] == ("False", "arg") and rows["wandb_mode"] == ("'disabled'", "arg")
    assert rows["runs_dir"] == (repr(str(tmp_path/"runs")), "env")  # the isolation itself works


def test_seed_environment_variables(tmp_path):
    env = clean_env(tmp_path, MODEL_TYPE="wideresnet10_1", EXPERT_ID="1", EPOCHS="3", EXPERT_LAB_N_EXPERTS="2")
    rows = config_rows(cli(tmp_path, "config", env=env).stdout)
    assert rows["model"] == ("'wideresnet10_1'", "env") and rows["expert_id"] == ("1", "env") and rows["epochs"] == ("3", "env")
    rows = config_rows(cli(tmp_path, "config", "--epochs", "4", env=env).stdout)
    assert rows["epochs"] == ("4", "arg"), "a flag beats the environment"
    # EXPERT_ID picks the one expert `train` runs
    r = cli(tmp_path, "train", "--dry-run", "--dataset", "digits", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == ["would train wideresnet10_1 expert 1/2 (iid) on digits"]
    assert files_under(tmp_path/"runs") == []


def test_no_wandb_both_spellings(tmp_path, monkeypatch, capsys):
    from expert_lab.cli import main
    for k in list(os.environ): monkeypatch.delenv(k) if k in _CONFIG_ENV or k.startswith("EXPERT_LAB_") else None
    for k, v in clean_env(tmp_path).items(): monkeypatch.setenv(k, v)
    for args, want in ((("--wandb", "--no_wandb"), "False"), (("--wandb", "--no-wandb"), "False"), (("--wandb",), "True"),
                       (("--wandb", "false"), "False"), (("--wandb=yes",), "True")):
        assert main(["config", *args]) == 0
        assert config_rows(capsys.readouterr().out)["wandb"] == (want, "arg"), args


def test_papermill_lists_the_runbook_parameters():
    r = subprocess.run([str(BIN/"papermill"), "--help-notebook", str(REPO/"nbs"/"train_expert.ipynb")],
                       capture_output=True, text=True, timeout=HANG_S)
    assert r.returncode == 0, r.stderr
    assert "Unable to parse" not in r.stdout + r.stderr, r.stdout + r.stderr
    for p in ("model: str", "expert_id: int", "dataset: str", "epochs: int", "batch_size: int", "steps_per_epoch: int",
              "config_json: str", "run_dir: str", "resume: bool"):
        assert p in r.stdout, (p, r.stdout)


def test_runbook_parameters_say_what_the_config_says():
    "Every config key is a parameter of the training runbook, with TrainConfig's type and, word for word, its meaning."
    import nbformat, re
    from expert_lab.config import FIELD_TYPES, field_docs
    nb = nbformat.read(REPO/"nbs"/"train_expert.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    said = {k: (t, doc) for k, t, doc in re.findall(r"^(\w+): (\w+) = None\s+# (.*)$", cell.source, re.M)}
    docs = field_docs()
    assert {k: said.get(k) for k in FIELD_TYPES} == {k: (t.__name__, docs[k]) for k, t in FIELD_TYPES.items()}


@pytest.mark.parametrize("name", ["compare_runs", "ensemble"])
def test_report_runbooks_have_typed_parameters(name):
    import nbformat
    from papermill.translators import PythonTranslator
    nb = nbformat.read(REPO/"nbs"/f"{name}.ipynb", as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    params = {p.name: p.inferred_type_name for p in PythonTranslator.inspect(cells[0])}
    want = dict(model="str", partition="str", runs_dir="str") | (dict(status="str") if name == "compare_runs" else dict(n_experts="int"))
    assert params == want


def test_train_help_explains_every_config_flag():
    from expert_lab.config import FIELD_TYPES, TRIAL_KEYS, field_docs
    r = subprocess.run([str(BIN/"expert-lab"), "train", "--help"], capture_output=True, text=True, timeout=HANG_S, env={**os.environ, "COLUMNS": "200"})
    text = " ".join(r.stdout.split())
    docs = field_docs()
    # --expert-id has its own help (one id, a list or all); the tuner's keys (study, trial) are no flag of train
    missing = [k for k in FIELD_TYPES if k not in ("expert_id", *TRIAL_KEYS) and (f"--{k.replace('_', '-')}" not in text or " ".join(docs[k].split()) not in text)]
    assert r.returncode == 0 and missing == [], missing
    assert not {"--study", "--trial"} & set(text.replace("[", " ").split())


# the lab book's index and the tuner, wired in by issue 24 (their modules are written beside the command line)

def isolate(monkeypatch, tmp_path):
    "This process's environment as `clean_env(tmp_path)`: settings, runs and data under `tmp_path`."
    for k in list(os.environ): monkeypatch.delenv(k) if k in _CONFIG_ENV or k.startswith("EXPERT_LAB_") else None
    for k, v in clean_env(tmp_path).items(): monkeypatch.setenv(k, v)


def completed_run(root:Path)->Path:
    "A completed run folder under `root`, with every file a run leaves, holding an untrained tiny network (no training)."
    from expert_lab.checkpoint import save_epoch
    from expert_lab.config import TrainConfig
    from expert_lab.experts import prepare_expert_data
    from expert_lab.files import write_json
    from expert_lab.models import create_model
    from expert_lab.runs import finish_record, new_run_dir, start_record
    cfg = TrainConfig(model="wideresnet10_1", dataset="digits", n_experts=1, device="cpu", epochs=2, runs_dir=str(root))
    d = new_run_dir(cfg, stamp="done"); start_record(d, cfg, {})
    data = prepare_expert_data(cfg)
    write_json(d/"partition.json", dict(train_idx=data.train_idx.tolist(), val_idx=data.val_idx.tolist()))
    net = create_model(cfg.model, num_classes=data.num_classes)
    save_epoch(dict(model=net.state_dict(), ema=None, best=dict(epoch=2, val_acc=0.1, weights="raw")), d/"checkpoints", best=True)
    finish_record(d, dict(status="completed", stop_reason="epochs_done", epochs_done=2, test_acc=0.1, test_top5=0.5))
    return d


@pytest.fixture
def labbook(monkeypatch):
    "The real lab book, its `write_index` counting its calls (and still writing)."
    book = pytest.importorskip("expert_lab.labbook", reason="expert_lab.labbook (the lab book's index) is not written yet")
    calls, real = [], book.write_index
    monkeypatch.setattr(book, "write_index", lambda root: calls.append(Path(root)) or real(root))
    book.calls = calls
    return book


def test_index_writes_the_lab_books_index(tmp_path, monkeypatch, capsys, labbook):
    from expert_lab.cli import main
    isolate(monkeypatch, tmp_path)
    completed_run(tmp_path/"elsewhere")
    assert main(["index", "--runs-dir", str(tmp_path/"elsewhere")]) == 0
    assert capsys.readouterr().out == f"{tmp_path/'elsewhere'/'index.html'}\n"
    assert (tmp_path/"elsewhere"/"index.html").exists() and labbook.calls == [tmp_path/"elsewhere"]
    assert main(["index"]) == 0 and labbook.calls[-1] == tmp_path/"runs"  # default: the settings' runs folder


def test_a_command_that_changes_runs_refreshes_the_index_once(tmp_path, monkeypatch, capsys, labbook):
    from expert_lab.cli import main
    isolate(monkeypatch, tmp_path)
    run = completed_run(tmp_path/"runs")
    assert main(["resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "nothing to train" in out and err == ""
    assert labbook.calls == [tmp_path/"runs"] and (tmp_path/"runs"/"index.html").exists()
    assert main(["runs"]) == 0 and main(["train", "--dataset", "digits", "--dry-run"]) == 0
    assert len(labbook.calls) == 1, "listing runs or a dry run changes no run: no refresh"


def test_a_failing_index_refresh_keeps_the_exit_status(tmp_path, monkeypatch, capsys, labbook):
    from expert_lab.cli import main
    isolate(monkeypatch, tmp_path)
    run = completed_run(tmp_path/"runs")
    def refused(root): raise PermissionError(f"[Errno 13] Permission denied: '{root}/index.html'")
    monkeypatch.setattr(labbook, "write_index", refused)
    assert main(["resume", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "nothing to train" in out
    assert err == f"expert-lab: warning: the runs index was not refreshed: [Errno 13] Permission denied: '{tmp_path/'runs'}/index.html'\n"
    assert main(["resume", str(tmp_path)]) == 2  # bad input stays bad input, with no refresh attempted
    assert "warning" not in capsys.readouterr().err


def test_tune_and_compare_study_reach_the_tuner(tmp_path, monkeypatch, capsys):
    pytest.importorskip("expert_lab.tune", reason="expert_lab.tune (the tuner) is not written yet")
    from expert_lab.cli import main
    isolate(monkeypatch, tmp_path)
    # everything after `tune` is the tuner's, which says what is wrong and exits with its own status
    assert main(["tune", "--lr", "0.05:0.2:log", "--dataset", "digits", "--trials", "0"]) == 2
    assert capsys.readouterr().err == "expert-lab: error: trials: must be >= 1, got 0\n"
    assert main(["compare", "--study", "nope"]) == 2
    assert "no study 'nope'" in capsys.readouterr().err
    assert files_under(tmp_path/"runs") == []  # refused input: not even the index is refreshed


@pytest.mark.parametrize("args", [["train", "--learning-rate", "0.1"], ["frobnicate"], ["runs"], ["runs", "--help"]])
def test_refusals_and_listings_start_without_torch(tmp_path, args):
    "torch is most of a start-up: a misspelt flag or command, a listing and a help page never load it (see `_heavy`)."
    code = f"import sys\nfrom expert_lab.cli import main\ntry: main({args!r})\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(tmp_path), timeout=HANG_S)
    assert r.stdout.splitlines()[-1] == "False", r.stdout + r.stderr
