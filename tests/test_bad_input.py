"""Bad input to `expert-lab train` is refused before any work: exit status 2, at most two lines, no traceback, and no new
file anywhere under runs/ or data/. Datasets, values, devices, checkpoints, flags, settings and environment.

The cases run `expert_lab.cli.main` in this process (each in a fresh project folder with its own settings, runs and
data), so a hundred refusals take seconds: none of them may reach a kernel. The read-back cases give the same values through
settings files, the environment and a resumed run's edited config.json: each is refused as if it had been typed."""
import argparse, json, os, shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from expert_lab.cli import main
from conftest import CONFIG_ENV

DIGITS = ["--dataset", "digits", "--model", "wideresnet10_1"]
RUN = "runs/mine"  # the named run folder the checkpoint cases resume


def _folder_dataset(p, bad=None):
    from PIL import Image
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (p/"data"/split/c).mkdir(parents=True)
            for i in range(4): Image.new("RGB", (32, 32), (i*40, 0, 0)).save(p/"data"/split/c/f"{i}.png")
    if bad == "png": (p/"data"/"train"/"dog"/"9.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if bad == "no test": shutil.rmtree(p/"data"/"test")
    if bad == "extra class": (p/"data"/"test"/"bird").mkdir(); Image.new("RGB", (32, 32)).save(p/"data"/"test"/"bird"/"0.png")


def _cifar(p, bad=None):
    from expert_lab.data import write_cifar_files
    write_cifar_files(p/"data", n_train=200, n_test=50, num_classes=100, seed=0)
    if bad == "pickle": (p/"data"/"cifar-100-python"/"train").write_bytes(b"\x80\x04not a pickle at all")


def _checkpoint(p, kind):
    "A run folder whose last.pt is truncated, holds pickled objects, or belongs to another run."
    from expert_lab.checkpoint import CHECKPOINT_FORMAT, save_checkpoint
    from expert_lab.config import resolve_config
    d = p/RUN/"checkpoints"; d.mkdir(parents=True)
    cfg, src = resolve_config(dict(model="wideresnet10_1", dataset="digits", runs_dir=str(p/"runs"), seed=5 if kind == "other run" else 0))
    (p/RUN/"config.json").write_text(json.dumps({"config": asdict(cfg), "sources": src}))
    (p/RUN/"metrics.json").write_text(json.dumps(dict(status="interrupted", started="2026-12-01T10:00:00")))
    if kind == "objects": torch.save({"format": CHECKPOINT_FORMAT, "config": argparse.Namespace(seed=0)}, d/"last.pt"); return
    save_checkpoint({"config": asdict(cfg), "epoch": 1, "weights": torch.zeros(4096)}, d/"last.pt")
    if kind == "truncated": (d/"last.pt").write_bytes((d/"last.pt").read_bytes()[:1500])


def _settings(text): return lambda p: (p/"settings.ini").write_text(text)

# id: (arguments after `train`, setup, environment, text the line must contain)
CASES = {
    # datasets
    "corrupt png in a folder dataset": (["--dataset", "folder", "--expert-id", "0"], lambda p: _folder_dataset(p, "png"), {}, "Cannot read image"),
    "folder dataset without test": (["--dataset", "folder", "--expert-id", "0"], lambda p: _folder_dataset(p, "no test"), {}, "test not found"),
    "folder test class not trained": (["--dataset", "folder", "--expert-id", "0"], lambda p: _folder_dataset(p, "extra class"), {}, "bird"),
    "corrupt cifar pickle": (["--dataset", "cifar100", "--expert-id", "0"], lambda p: _cifar(p, "pickle"), {}, "not a CIFAR python-pickle"),
    "cifar missing offline": (["--dataset", "cifar10", "--expert-id", "0"], None, {}, "CIFAR-10 files not found"),
    "unknown dataset": (["--dataset", "imagenet"], None, {}, "dataset"),
    # values
    "validation larger than the data": (DIGITS + ["--val-size", "5000"], None, {}, "val_size"),
    "batch larger than a shard": (DIGITS + ["--n-experts", "4", "--batch-size", "1000"], None, {}, "fewer than batch_size=1000"),
    "zero epochs": (DIGITS + ["--epochs", "0"], None, {}, "epochs: must be > 0"),
    "negative lr": (DIGITS + ["--lr", "-0.1"], None, {}, "lr: must be > 0"),
    "mixup not a number": (DIGITS + ["--mixup-alpha", "abc"], None, {}, "mixup_alpha"),
    "label smoothing above 1": (DIGITS + ["--label-smoothing", "1.5"], None, {}, "label_smoothing"),
    "batch size not an integer": (DIGITS + ["--batch-size", "1.5"], None, {}, "batch_size: expected an integer"),
    "unknown partition": (DIGITS + ["--partition", "random"], None, {}, "partition"),
    "superclass without coarse labels": (DIGITS + ["--partition", "superclass"], None, {}, "superclass"),
    "more class experts than classes": (DIGITS + ["--partition", "classes", "--n-experts", "20", "--expert-id", "0"], None, {}, "classes"),
    "dirichlet alpha zero": (DIGITS + ["--partition", "dirichlet", "--dirichlet-alpha", "0"], None, {}, "dirichlet_alpha"),
    "unknown scheduler": (DIGITS + ["--scheduler", "step"], None, {}, "scheduler"),
    "unknown precision": (DIGITS + ["--precision", "fp8"], None, {}, "precision"),
    "expert beyond n_experts": (DIGITS + ["--n-experts", "4", "--expert-id", "7"], None, {}, "expert_id"),
    "impossible wide resnet depth": (["--dataset", "digits", "--model", "wideresnet11_2"], None, {}, "model"),
    "unknown model": (["--dataset", "digits", "--model", "resnet19"], None, {}, "did you mean 'resnet18'"),
    # devices
    "cuda without a gpu": (DIGITS + ["--device", "cuda"], None, {}, "no CUDA GPU"),
    "cuda index without a gpu": (DIGITS + ["--device", "cuda:3"], None, {}, "cuda:3"),
    "unknown device": (DIGITS + ["--device", "tpu"], None, {}, "device"),
    # values whose cost would grow with them: refused from the dataset's size, before any split or padding
    "a billion experts": (DIGITS + ["--n-experts", "1000000000", "--expert-id", "0"], None, {}, "n_experts: 1000000000 experts cannot share"),
    "crop padding wider than the images": (DIGITS + ["--crop-padding", "1000000000"], None, {}, "crop_padding"),
    # checkpoints of a named run folder
    "truncated last.pt": (DIGITS + ["--expert-id", "0", "--run-dir", RUN], lambda p: _checkpoint(p, "truncated"), {}, "truncated or corrupt"),
    "last.pt holding python objects": (DIGITS + ["--expert-id", "0", "--run-dir", RUN], lambda p: _checkpoint(p, "objects"), {}, "refused to load"),
    "last.pt of another run": (DIGITS + ["--expert-id", "0", "--run-dir", RUN], lambda p: _checkpoint(p, "other run"), {}, "belongs to a different run"),
    # flags
    "expert id not a number": (DIGITS + ["--expert-id", "two"], None, {}, "expert_id"),
    "unknown flag": (DIGITS + ["--learning-rate", "0.1"], None, {}, "unknown option --learning-rate"),
    "run dir for several experts": (DIGITS + ["--run-dir", RUN], None, {}, "needs exactly one --expert-id"),
    "parallel zero": (DIGITS + ["--parallel", "0"], None, {}, "parallel"),
    # settings
    "settings value of the wrong type": (DIGITS, _settings("[training]\nepochs = many\n"), {}, "epochs: expected an integer"),
    "settings unknown key": (DIGITS, _settings("[training]\nlearning_rate = 0.1\n"), {}, "learning_rate"),
    "settings not an ini file": (DIGITS, _settings("epochs = 3\n"), {}, "not a valid settings file"),
    # environment
    "env value of the wrong type": (DIGITS, None, {"EXPERT_LAB_EPOCHS": "ten"}, "EXPERT_LAB_EPOCHS"),
    "env unknown key": (DIGITS, None, {"EXPERT_LAB_LEARNING_RATE": "0.1"}, "EXPERT_LAB_LEARNING_RATE"),
    "seed env unknown model": (["--dataset", "digits"], None, {"MODEL_TYPE": "nosuch"}, "nosuch"),
    "seed env zero epochs": (DIGITS, None, {"EPOCHS": "0"}, "epochs"),
}

# every float key, NaN and both infinities: `nan <= 0` is False, so a range check alone lets them through
_FLOATS = [k for k, t in __import__("expert_lab.config", fromlist=["FIELD_TYPES"]).FIELD_TYPES.items() if t is float]
CASES |= {f"{k} {v}": (DIGITS + [f"--{k.replace('_', '-')}", v], None, {}, k) for k in _FLOATS for v in ("nan", "inf", "-inf")}


def _files(root):
    "Every file under `root` with its bytes' hash and modification time: what a refusal must leave as it was."
    import hashlib
    return {p: (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest()) for p in root.rglob("*") if p.is_file()}


# --- values read back: settings files, the environment, a resumed run's config.json, folders --------------------------

DONE = "runs/wideresnet10_1/iid-2/expert-0/done"  # a completed run's folder, as `_completed` makes it


def _completed(edit=None):
    "A completed run folder (`DONE`) whose config.json `edit` changes, as a user's editor might."
    def setup(p):
        from test_catalog import make_run
        d = make_run(p/"runs", stamp="done")
        j = json.loads((d/"config.json").read_text())
        if edit: edit(j["config"])
        (d/"config.json").write_text(json.dumps(j) if edit != "garbage" else "{not json")
    return setup


def _bytes(name, data): return lambda p: (p/name).write_bytes(data)

# id: (full arguments, setup, environment, text the line must contain)
READ_BACK = {
    # settings files
    "settings not utf-8": (["train", *DIGITS], _bytes("settings.ini", "[tracking]\nwandb_project = caf\xe9\n".encode("latin-1")), {}, "line 2"),
    "settings unknown section": (["train", *DIGITS], _settings("[trainig]\nepochs = 3\n"), {}, "trainig"),
    "settings unknown key names the file": (["config"], _settings("[training]\nlearning_rate = 0.1\n"), {}, "settings.ini"),
    "settings lr nan": (["train", *DIGITS], _settings("[training]\nlr = nan\n"), {}, "lr"),
    "settings weight decay inf": (["config"], _settings("[training]\nweight_decay = inf\n"), {}, "weight_decay"),
    "settings file missing": (["config"], None, {"EXPERT_LAB_SETTINGS": "/nonexistent/site.ini"}, "/nonexistent/site.ini"),
    "settings file is a folder": (["runs"], None, {"EXPERT_LAB_SETTINGS": "/tmp"}, "/tmp"),
    # environment
    "env lr nan": (["train", *DIGITS], None, {"EXPERT_LAB_LR": "nan"}, "EXPERT_LAB_LR"),
    "env momentum inf": (["config"], None, {"EXPERT_LAB_MOMENTUM": "inf"}, "EXPERT_LAB_MOMENTUM"),
    "env device mps": (["train", *DIGITS], None, {"EXPERT_LAB_DEVICE": "mps"}, "mps"),
    # flags that name places and devices
    "device mps": (["train", *DIGITS, "--device", "mps"], None, {}, "mps"),
    "device mps in config": (["config", "--device", "mps"], None, {}, "mps"),
    "empty runs dir": (["train", *DIGITS, "--runs-dir", ""], None, {}, "runs_dir"),
    "empty data root": (["train", *DIGITS, "--data-root", ""], None, {}, "data_root"),
    # a resumed run's config.json, edited
    "resume lr -1": (["resume", DONE], _completed(lambda c: c.update(lr=-1)), {}, "lr"),
    "resume epochs text": (["resume", DONE], _completed(lambda c: c.update(epochs="abc")), {}, "epochs"),
    "resume lr nan": (["resume", DONE], _completed(lambda c: c.update(lr=float("nan"))), {}, "lr"),
    "resume unknown model": (["resume", DONE], _completed(lambda c: c.update(model="resnet19")), {}, "resnet19"),
    "resume unknown scheduler": (["resume", DONE], _completed(lambda c: c.update(scheduler="step")), {}, "scheduler"),
    "resume device mps": (["resume", DONE], _completed(lambda c: c.update(device="mps")), {}, "mps"),
    "resume config a list": (["resume", DONE], lambda p: (_completed()(p), (p/DONE/"config.json").write_text("[]")), {}, "config.json"),
    "resume config not json": (["resume", DONE], lambda p: (_completed()(p), (p/DONE/"config.json").write_text("{")), {}, "config.json"),
    # folders
    "run dir is a file": (["train", *DIGITS, "--expert-id", "0", "--run-dir", "settings.ini"], _settings("[training]\n"), {}, "run_dir"),
    "one-class folder dataset": (["train", "--dataset", "folder", "--expert-id", "0", "--n-experts", "1"],
                                 lambda p: (_folder_dataset(p), shutil.rmtree(p/"data"/"train"/"dog"), shutil.rmtree(p/"data"/"test"/"dog")), {}, "class"),
}


@pytest.mark.parametrize("args,setup,env,says", CASES.values(), ids=CASES.keys())
def test_refused_before_any_work(tmp_path, monkeypatch, capsys, args, setup, env, says):
    _refused(tmp_path, monkeypatch, capsys, ["train", *args], setup, env, says)


@pytest.mark.parametrize("args,setup,env,says", READ_BACK.values(), ids=READ_BACK.keys())
def test_read_back_refused_like_typed(tmp_path, monkeypatch, capsys, args, setup, env, says):
    _refused(tmp_path, monkeypatch, capsys, args, setup, env, says)


def _refused(tmp_path, monkeypatch, capsys, args, setup, env, says):
    "`expert-lab ARGS` in a fresh project: exit 2, at most two lines naming `says`, no traceback, every file as it was."
    p = tmp_path/"project"; p.mkdir()
    for k in list(os.environ):
        if k in CONFIG_ENV or k.startswith("EXPERT_LAB_"): monkeypatch.delenv(k)
    if setup: setup(p)
    settings = str(p/"settings.ini") if (p/"settings.ini").exists() else os.devnull
    for k, v in (dict(EXPERT_LAB_ROOT=str(p), EXPERT_LAB_SETTINGS=settings, EXPERT_LAB_RUNS_DIR=str(p/"runs"),
                      EXPERT_LAB_DATA_ROOT=str(p/"data")) | env).items(): monkeypatch.setenv(k, v)
    before = _files(p)
    monkeypatch.chdir(p)  # relative folders (`--run-dir settings.ini`) are the project's
    rc = main([a.replace(RUN, str(p/RUN)).replace(DONE, str(p/DONE)) for a in args])
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    assert rc == 2, out + err
    assert "Traceback" not in out + err and len(lines) <= 2, lines
    assert says in err, err
    assert _files(p) == before, "nothing new or changed under runs/ or data/"
