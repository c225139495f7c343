"""The ensemble's learned gate and its checks, on generated experts: untrained tiny wide ResNets on the digits dataset,
written as completed run folders (config.json, metrics.json, partition.json, checkpoints/best.pt) under pytest's tmp
folder. The gate must be fitted on held-out validation images only, the report must show it, bad groups of experts are
refused in one line, and a damaged run folder is skipped by name."""
import json
from dataclasses import asdict
from pathlib import Path

import nbformat
import pytest
import torch

from expert_lab.checkpoint import save_checkpoint
from expert_lab.config import TrainConfig
from expert_lab.data import load_dataset, validation_split
from expert_lab.ensemble import (check_experts, combine_gated, experts_outputs, fit_gate, heldout_indices, predict_probs,
                                 load_expert)
from expert_lab.files import write_json
from expert_lab.models import create_model

MODEL = "wideresnet10_1"


def fake_expert(root:Path, k:int, n:int=2, dataset:str="digits", num_classes:int=10, val_size:int=144)->Path:
    "A completed run folder for expert `k` of `n` (iid), with untrained weights and the shared validation split."
    ds = load_dataset("digits")
    pool, val = validation_split(ds.train_y, val_size, seed=0)
    d = root/MODEL/f"iid-{n}"/f"expert-{k}"/"20250101-100000"
    (d/"checkpoints").mkdir(parents=True)
    write_json(d/"config.json", {"config": asdict(TrainConfig(model=MODEL, dataset=dataset, n_experts=n, expert_id=k)), "sources": {}})
    write_json(d/"metrics.json", dict(status="completed", model=MODEL, partition="iid", n_experts=n, expert_id=k, dataset=dataset,
                                      test_acc=0.1, best_val_acc=0.1, epochs_done=1, started="2025-01-01T10:00:00"))
    write_json(d/"partition.json", dict(partition="iid", n_experts=n, expert_id=k, seed=0, train_idx=pool[k::n].tolist(),
                                        val_idx=val.tolist()))
    torch.manual_seed(k)
    net = create_model(MODEL, num_classes=num_classes)
    save_checkpoint(dict(model=net.state_dict(), ema=None, best=dict(epoch=1, val_acc=0.1, weights="raw")), d/"checkpoints"/"best.pt")
    return d


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return root, [fake_expert(root, k) for k in range(2)]


def test_gate_is_fitted_on_validation_images_only(experts, one_thread):
    root, dirs = experts
    out = experts_outputs(dirs)
    gate = fit_gate(out.heldout, out.heldout_y, out.heldout_idx)
    seen = sorted(gate.fit_idx.tolist() + gate.stop_idx.tolist())
    parts = [json.loads((d/"partition.json").read_text()) for d in dirs]
    assert seen == sorted(parts[0]["val_idx"]) == heldout_indices(dirs).tolist()
    assert len(seen) == len(set(seen)) == 144 and not set(gate.fit_idx.tolist()) & set(gate.stop_idx.tolist())
    for p in parts: assert not set(seen) & set(p["train_idx"])
    # what the gate was fitted on are those training-set images' predictions, not the test set's
    ds = out.ds
    want = predict_probs(load_expert(dirs[0], ds.num_classes), ds.train_x[gate.fit_idx], ds.mean, ds.std)
    pos = {int(i): j for j, i in enumerate(out.heldout_idx)}
    got = out.heldout[0][[pos[int(i)] for i in gate.fit_idx]]
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(out.heldout_y, ds.train_y[out.heldout_idx])
    mix, w = combine_gated(out.test, gate)
    assert mix.shape == (len(ds.test_y), 10) and torch.allclose(w.sum(1), torch.ones(len(ds.test_y)), atol=1e-5)


def test_validation_images_an_expert_trained_on_are_not_held_out(tmp_path):
    "An expert with another validation split: the images it trained on are not used to fit the gate."
    a = fake_expert(tmp_path, 0, val_size=144)
    b = fake_expert(tmp_path/"other", 1, val_size=100)  # another split: part of a's validation images are b's training images
    va, tb = (set(json.loads((d/"partition.json").read_text())[k]) for d, k in ((a, "val_idx"), (b, "train_idx")))
    held = set(heldout_indices([a, b]).tolist())
    assert va & tb and held and not held & tb and held <= va


def one_line_error(run_dirs)->str:
    with pytest.raises(ValueError) as e: check_experts(run_dirs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_experts_refuses_bad_groups(tmp_path, experts):
    _, dirs = experts
    assert check_experts(dirs) is None
    assert one_line_error([]) == "no completed experts to combine"
    other = fake_expert(tmp_path/"c10", 1, dataset="cifar10")
    msg = one_line_error([dirs[0], other])
    assert msg.startswith("the experts have different datasets (digits in ") and "cifar10 in " in msg
    wide = fake_expert(tmp_path/"wide", 1, num_classes=12)
    msg = one_line_error([dirs[0], wide])
    assert "different class counts (10 classes in " in msg and "12 classes in " in msg
    running = fake_expert(tmp_path/"run", 1)
    write_json(running/"metrics.json", dict(status="running"))
    assert "not a completed run (status 'running')" in one_line_error([dirs[0], running])
    assert "not a readable run folder" in one_line_error([dirs[0], tmp_path/"nowhere"])


def notebook_text(path:Path)->tuple[str, list]:
    "The executed notebook's text outputs joined, and the cells' sources with their output types."
    nb = nbformat.read(path, as_version=4)
    text, cells = [], []
    for c in nb.cells:
        if c.cell_type != "code": continue
        kinds = set()
        for o in c.get("outputs", []):
            if o.get("text"): text.append(o["text"])
            for k, v in o.get("data", {}).items(): kinds.add(k); text.append(v if k.startswith("text/") else "")
        cells.append((c.source, kinds))
    return "\n".join(text), cells


@pytest.mark.slow
def test_ensemble_report_shows_the_gate(experts):
    "The report as `expert-lab ensemble` executes it (papermill, the project's kernel) over the generated experts."
    import papermill as pm
    root, dirs = experts
    dst = root/"report.ipynb"
    pm.execute_notebook(str(Path(__file__).resolve().parents[1]/"nbs"/"ensemble.ipynb"), str(dst), kernel_name="expert-lab",
                        parameters=dict(model=MODEL, partition="iid", n_experts=0, runs_dir=str(root)), progress_bar=False)
    text, cells = notebook_text(dst)
    assert "2 of 2 experts have a completed run" in text
    assert "gate: 42 parameters, fitted on 108 held-out validation images, early-stopped on 36 at step" in text
    line = next(l for l in text.splitlines() if l.startswith("ensemble of 2 experts: "))
    assert "mean " in line and "routed " in line and ", gate " in line
    assert any(l.split()[:1] == ["gate"] for l in text.splitlines())  # the gate's row in the table of combinations
    for call in ("plot_gate_weights(", "plot_accuracy_vs_n("):  # drawn by expert_lab.plots, not inline
        fig = [kinds for src, kinds in cells if call in src]
        assert fig == [fig[0]] and "image/png" in fig[0], call
    assert "sns." not in "".join(src for src, _ in cells)
    assert "mean gate weight per expert: expert 0 " in text
    nb = nbformat.read(dst, as_version=4)
    wiring = [c for c in nb.cells if c.cell_type == "code" and "parameters" not in c.metadata.get("tags", [])
              and "injected-parameters" not in c.metadata.get("tags", [])]
    assert wiring and all("remove_input" in c.metadata.get("tags", []) for c in wiring)  # the HTML shows their output only
    for d in dirs: assert (d/"checkpoints"/"best.pt").exists()  # the report only read them


@pytest.mark.slow
def test_ensemble_report_without_experts_says_so_once(tmp_path):
    "No completed expert: the first section says there is nothing to combine; every later one shows nothing and fails nothing."
    import papermill as pm
    dst = tmp_path/"report.ipynb"
    pm.execute_notebook(str(Path(__file__).resolve().parents[1]/"nbs"/"ensemble.ipynb"), str(dst), kernel_name="expert-lab",
                        parameters=dict(model=MODEL, partition="iid", n_experts=0, runs_dir=str(tmp_path)), progress_bar=False)
    text, cells = notebook_text(dst)
    assert text.count("No completed runs") == 1 and "this report has nothing more to show" in text
    shown = [c.source for c in nbformat.read(dst, as_version=4).cells if c.cell_type == "code" and c.get("outputs")]
    assert len(shown) == 1 and "No completed runs" in shown[0]  # no other cell has output


@pytest.mark.slow
def test_compare_and_ensemble_reports_go_on_past_a_damaged_folder(tmp_path):
    "Issue 19.2: one metrics.json that is not JSON made both reports fail with a traceback; now it is skipped by name."
    import papermill as pm
    nbs = Path(__file__).resolve().parents[1]/"nbs"
    good, bad = fake_expert(tmp_path, 0), fake_expert(tmp_path, 1)
    (bad/"metrics.json").write_text("{not json")
    for name, params in (("compare_runs", dict(model="", partition="", status="")),
                         ("ensemble", dict(model=MODEL, partition="iid", n_experts=0))):
        dst = tmp_path/f"{name}.ipynb"
        pm.execute_notebook(str(nbs/f"{name}.ipynb"), str(dst), kernel_name="expert-lab", progress_bar=False,
                            parameters={**params, "runs_dir": str(tmp_path)})
        text, _ = notebook_text(dst)
        nb = nbformat.read(dst, as_version=4)
        warnings = [o["text"] for c in nb.cells for o in c.get("outputs", []) if o.get("name") == "stderr" and "damaged" in o["text"]]
        assert len(warnings) == 1 and warnings[0].count("\n") == 1 and str(bad) in warnings[0] and "not valid JSON" in warnings[0], name
        assert "1 runs (filters: none)" in text if name == "compare_runs" else "1 of 2 experts have a completed run" in text
