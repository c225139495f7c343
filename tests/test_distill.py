"""Tests of distillation (`expert_lab.distill` and its path through `expert_lab.train`): which experts teach, the teacher
seeing the student's exact batch without autograd, a student run that completes, resumes exactly and is compared with
its teachers, and the one-line refusals of bad input. Two tiny digits experts are trained once for the whole module."""
import json, shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from expert_lab.checkpoint import CheckpointError, load_checkpoint, save_epoch
from expert_lab.config import ConfigError
from expert_lab.distill import Teacher, distill_comparison, distill_jobs, distill_loss, teacher_runs
from expert_lab.notebook_run import HistoryCSV
from expert_lab.experts import prepare_expert_data
from expert_lab.files import write_json
from expert_lab.models import create_model
from expert_lab.runs import finish_record, new_run_dir, start_record
from expert_lab.train import setup_training, train, train_epoch

from conftest import tiny_config
from test_sync import check_independent_of_steps, epoch_reads

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
TIMING = ("seconds", "images_per_sec")


def train_expert(cfg, stamp=None):
    "Train `cfg` into a new run folder of the runs tree, leaving the files a runbook leaves; return the folder."
    d = new_run_dir(cfg, stamp)
    start_record(d, cfg, {})
    data = prepare_expert_data(cfg)
    write_json(d/"partition.json", dict(partition=cfg.partition, n_experts=cfg.n_experts, expert_id=cfg.expert_id, seed=cfg.seed,
                                        train_idx=data.train_idx.tolist(), val_idx=data.val_idx.tolist()))
    finish_record(d, train(cfg, run_dir=d, hooks=[HistoryCSV(d/"history.csv")], progress="none").metrics)
    return d


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    "(runs folder, [expert run folders]): two tiny iid experts of wideresnet10_1 on digits, trained once."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill")/"runs"
    dirs = [train_expert(tiny_config(n_experts=2, expert_id=k, epochs=2, runs_dir=str(root)), f"run-{k}") for k in range(2)]
    torch.set_num_threads(n)
    return root, dirs


def student(root, **kw):
    "A seconds-long student of the two experts."
    return tiny_config(partition="full", n_experts=1, epochs=2, runs_dir=str(root), distill_from="wideresnet10_1/iid-2",
                       mixup_alpha=0.2, **kw)


def tree(root): return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def one_line(excinfo): return "\n" not in str(excinfo.value) and str(excinfo.value)


def same_run(a, b):
    "Histories and test metrics equal, timings aside."
    strip = lambda h: [{k: v for k, v in r.items() if k not in TIMING} for r in h]
    assert strip(a.history) == strip(b.history)
    keys = ("epochs_done", "best_epoch", "best_val_acc", "test_loss", "test_acc", "confusion")
    assert {k: a.metrics[k] for k in keys} == {k: b.metrics[k] for k in keys}


# --- which experts teach
def test_teacher_runs_are_the_completed_experts_of_the_group(experts):
    root, dirs = experts
    assert teacher_runs("wideresnet10_1/iid-2", root) == dirs
    with pytest.raises(ConfigError, match="no completed experts of wideresnet10_1/classes-2") as e: teacher_runs("wideresnet10_1/classes-2", root)
    assert one_line(e)
    with pytest.raises(ConfigError, match="is not <model>/<partition>-<n>"): teacher_runs("wideresnet10_1/iid", root)


def _copy_group(root, dirs, dest):
    "A copy of the experts' folders under another runs folder; returns the copies."
    out = []
    for d in dirs:
        c = Path(dest)/Path(d).relative_to(root); shutil.copytree(d, c); out.append(c)
    return out


def test_experts_of_different_datasets_or_class_counts_are_refused(experts, tmp_path):
    root, dirs = experts
    a = _copy_group(root, dirs, tmp_path/"a")
    j = json.loads((a[1]/"config.json").read_text()); j["config"]["dataset"] = "cifar10"
    (a[1]/"config.json").write_text(json.dumps(j))
    with pytest.raises(ConfigError, match="different datasets \\(digits in .*; cifar10 in ") as e: teacher_runs("wideresnet10_1/iid-2", tmp_path/"a")
    assert one_line(e)
    b = _copy_group(root, dirs, tmp_path/"b")
    five = create_model("wideresnet10_1", num_classes=5).state_dict()
    save_epoch(dict(model=five, ema=None, best=dict(epoch=1, val_acc=0.5, weights="raw")), b[1]/"checkpoints", best=True)
    with pytest.raises(ConfigError, match="different class counts \\(10 classes in .*; 5 classes in ") as e: teacher_runs("wideresnet10_1/iid-2", tmp_path/"b")
    assert one_line(e)


def test_a_group_with_a_missing_expert_is_refused(experts, tmp_path):
    root, dirs = experts
    a = _copy_group(root, dirs[:1], tmp_path/"a")
    with pytest.raises(ConfigError, match="expert\\(s\\) 1 of wideresnet10_1/iid-2 have no completed run") as e:
        teacher_runs("wideresnet10_1/iid-2", tmp_path/"a")
    assert one_line(e)


# --- the command line's job
def test_distill_jobs_resolve_the_student_on_its_teachers_data(experts):
    root, dirs = experts
    (cfg, sources), = distill_jobs("wideresnet10_1", "iid", "resnet18", dict(runs_dir=str(root), epochs=3))
    assert (cfg.model, cfg.partition, cfg.n_experts, cfg.expert_id, cfg.distill_from, cfg.dataset, cfg.epochs) == \
           ("resnet18", "full", 1, 0, "wideresnet10_1/iid-2", "digits", 3)
    assert sources["distill_from"] == "arg" and distill_jobs("wideresnet10_1", "iid-2", args=dict(runs_dir=str(root)))[0][0].model == "wideresnet10_1"
    part = json.loads((dirs[0]/"partition.json").read_text())
    data = prepare_expert_data(cfg)  # the student is validated on the teachers' hold-out and trains on everything else
    assert data.val_idx.tolist() == part["val_idx"] and len(data.train_idx) + len(data.val_idx) == len(data.dataset.train_y)


@pytest.mark.parametrize("args, message", [
    (("wideresnet10_1", "iid", "resnet_18"), "model: unknown model 'resnet_18' \\(did you mean 'resnet18'\\?\\)"),
    (("wideresnet10_1", "classes"), "no completed experts of wideresnet10_1/classes"),
    (("resnet18", "iid-4"), "no completed experts of resnet18/iid-4"),
])
def test_bad_distill_input_is_one_line_and_creates_nothing(experts, args, message):
    root, _ = experts
    before = tree(root)
    with pytest.raises(ConfigError, match=message) as e: distill_jobs(*args, args=dict(runs_dir=str(root)))
    assert one_line(e) and tree(root) == before


def test_a_student_of_another_dataset_is_refused(experts):
    root, _ = experts
    with pytest.raises(ConfigError, match="trained on digits, not cifar10") as e: distill_jobs("wideresnet10_1", "iid", args=dict(runs_dir=str(root), dataset="cifar10"))
    assert one_line(e)


# --- the step
def test_the_teacher_sees_the_students_exact_batch_without_autograd(experts):
    root, dirs = experts
    cfg = student(root, random_erasing=0.5, cutmix_alpha=1.0)
    st = setup_training(cfg, prepare_expert_data(cfg), torch.device("cpu"))
    seen = dict(student=[], teacher=[])
    st.model.register_forward_pre_hook(lambda m, a: seen["student"].append((a[0].clone(), torch.is_grad_enabled(), m.training)))
    for m in st.objective.teacher.experts:
        m.register_forward_pre_hook(lambda m, a: seen["teacher"].append((a[0].clone(), torch.is_grad_enabled(), m.training)))
    train_epoch(st)
    assert st.objective.teacher.run_dirs == [str(d) for d in dirs] and len(seen["student"]) == cfg.steps_per_epoch
    assert len(seen["teacher"]) == 2*cfg.steps_per_epoch  # each expert once per step
    for i, (x, grad, training) in enumerate(seen["student"]):
        assert grad and training
        for x_t, grad_t, training_t in seen["teacher"][2*i:2*i + 2]:
            assert torch.equal(x_t, x) and not grad_t and not training_t  # the same augmented, mixed batch; no graph; eval mode
    assert not any(p.requires_grad for p in st.objective.teacher.parameters())


def test_alpha_zero_trains_exactly_as_the_labels_do(experts):
    "The teacher's presence changes nothing but the loss: no random draws, no other step (the no-op path, checked)."
    root, _ = experts
    cfg = student(root, distill_alpha=0.0)
    a, b = train(cfg, progress="none"), train(replace(cfg, distill_from=""), progress="none")
    same_run(a, b)
    assert a.metrics["teachers"] and "teachers" not in b.metrics
    taught = train(replace(cfg, distill_alpha=0.5, epochs=1), progress="none")  # and the soft term does change training
    assert taught.history[0]["train_loss"] != b.history[0]["train_loss"]


def test_a_distillation_epoch_reads_the_device_a_fixed_number_of_times(experts):
    root, _ = experts
    check_independent_of_steps(epoch_reads, student(root))


def test_distill_loss_is_hintons():
    s, q = torch.randn(6, 10), torch.softmax(torch.randn(6, 10), 1)
    t = torch.nn.functional.one_hot(torch.arange(6), 10).float()
    kl = torch.nn.functional.kl_div(torch.log_softmax(s/3, 1), q, reduction="batchmean")
    ce = -(t*torch.log_softmax(s, 1)).sum(1).mean()
    assert torch.allclose(distill_loss(s, q, t, 3.0, 0.25), 0.25*9*kl + 0.75*ce, atol=1e-6)


# --- whole runs
def test_distillation_completes_and_its_report_compares_the_three(experts, tmp_path):
    root, dirs = experts
    cfg = student(root)
    r = train(cfg, run_dir=tmp_path, progress="none")
    assert (r.metrics["status"], r.metrics["epochs_done"]) == ("completed", 2) and r.metrics["test_acc"] is not None
    assert r.metrics["teachers"] == [str(d) for d in dirs]
    assert load_checkpoint(tmp_path/"checkpoints"/"last.pt")["teachers"] == [str(d) for d in dirs]
    table = distill_comparison(cfg, r.metrics)
    assert [m.split(" (")[0] for m in table.method] == ["student", "best single expert", "mean ensemble", "routed ensemble", "gated ensemble"]
    assert table.test_acc[0] == r.metrics["test_acc"] and table.test_acc.between(0, 1).all()
    best = max(json.loads((d/"metrics.json").read_text())["test_acc"] for d in dirs)
    assert table.test_acc[1] == pytest.approx(best, abs=1e-6)  # the experts' own test accuracy, recomputed from their predictions
    assert list(table.networks) == [1, 1, 2, 2, 2] and table.params[2] == 2*table.params[1]


def test_distillation_resumes_after_an_interrupt_with_the_same_teachers(experts, tmp_path):
    root, dirs = experts
    class CtrlC:
        def on_epoch_end(self, record, state):
            if record["epoch"] == 1: raise KeyboardInterrupt
    cfg = student(root)
    r = train(cfg, run_dir=tmp_path, hooks=[CtrlC()], progress="none")
    assert (r.metrics["status"], r.metrics["epochs_done"]) == ("interrupted", 1)
    with pytest.raises(CheckpointError, match="learned from .*expert-0.*, this run from the labels only"):
        train(replace(cfg, distill_from=""), run_dir=tmp_path, progress="none")
    # a newer run of expert 0 completes meanwhile: the resumed student keeps the teachers it started with
    newer = train_expert(tiny_config(n_experts=2, expert_id=0, epochs=1, runs_dir=str(root)), "run-newer")
    try:
        assert teacher_runs(cfg.distill_from, root)[0] == newer
        done = train(cfg, run_dir=tmp_path, progress="none")
    finally: shutil.rmtree(newer)  # the other tests' experts stay as they were
    assert (done.metrics["status"], done.metrics["resumed_from_epoch"]) == ("completed", 1)
    assert done.metrics["teachers"] == [str(d) for d in dirs]
    same_run(done, train(cfg, progress="none"))  # exactly the uninterrupted student


class StopAfter:
    "The engine's in-process stop, without a signal: asks the loop to stop at its `n`-th look between two steps."
    def __init__(self, n): self.n, self.looks, self.signame = n, 0, "test stop"
    def __call__(self): return self  # stands in for the `_StopOnSignal` class: `train` makes one per run
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    @property
    def requested(self):
        self.looks += 1
        return self.looks >= self.n


def test_a_student_stopped_mid_epoch_resumes_exactly(experts, tmp_path, monkeypatch):
    import expert_lab.train as engine
    root, dirs = experts
    cfg = student(root, ema=True)
    monkeypatch.setattr(engine, "_StopOnSignal", StopAfter(7))  # 4 steps per epoch: look 7 is before step 3 of epoch 2
    r = train(cfg, run_dir=tmp_path, progress="none")
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path/"checkpoints"/"last.pt")
    assert (r.metrics["status"], ck["epoch"], ck["step"], ck["teachers"]) == ("interrupted", 1, 2, [str(d) for d in dirs])
    done = train(cfg, run_dir=tmp_path, progress="none")
    assert (done.metrics["status"], done.metrics["resumed_from_epoch"]) == ("completed", 1)
    same_run(done, train(cfg, progress="none"))


@pytest.mark.slow
def test_a_student_trains_through_the_runbook(experts, tmp_path):
    "`expert-lab distill` runs the student through papermill: the runbook brings in its objective and the student learns."
    from conftest import isolated_env, run_cli
    root, dirs = experts
    copies = _copy_group(root, dirs, tmp_path/"runs")
    env = isolated_env(tmp_path, EXPERT_LAB_RUNS_DIR=str(tmp_path/"runs"))
    r = run_cli(tmp_path, "distill", "--model", "wideresnet10_1", "--partition", "iid-2", "--epochs", "1", "--restart-period", "1",
                "--steps-per-epoch", "2", "--batch-size", "32", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    [run] = (tmp_path/"runs"/"wideresnet10_1"/"distill-iid-2"/"expert-0").iterdir()
    m = json.loads((run/"metrics.json").read_text())
    assert m["status"] == "completed" and m["teachers"] == [str(c) for c in copies], m
    assert load_checkpoint(run/"checkpoints"/"last.pt")["teachers"] == m["teachers"]  # a resume keeps its teachers


def test_importing_distill_registers_the_students_objective_and_a_plain_run_never_loads_it():
    "In a fresh process: the loop and a plain run's objective leave distill unloaded; importing it registers `distillation`."
    import subprocess, sys
    code = ("import sys\nfrom expert_lab.config import ConfigError, TrainConfig\nfrom expert_lab.recipe import objective_for\n"
            "import expert_lab.train\nobjective_for(TrainConfig())\nprint('expert_lab.distill' in sys.modules)\n"
            "try: objective_for(TrainConfig(distill_from='m/iid-2'))\nexcept ConfigError as e: print(str(e).split(': ', 1)[1])\n"
            "from expert_lab.distill import distillation\nprint(objective_for(TrainConfig(distill_from='m/iid-2')) is distillation)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.splitlines() == ["False", "'m/iid-2' asks for the objective expert_lab.distill defines: import expert_lab.distill before training",
                                     "True"], r.stdout + r.stderr
