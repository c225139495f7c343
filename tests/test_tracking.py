"Optional trackers: wandb offline and TensorBoard mirror a real (tiny) training run into its run folder."
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from expert_lab.config import ConfigError, resolve_config
from expert_lab.tracking import check_tracking, tracking_hooks
from expert_lab.train import train


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_record_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(1)
    cfg, _ = resolve_config(dict(model="wideresnet10_1", dataset="digits", n_experts=1, epochs=2, steps_per_epoch=2,
                                 batch_size=32, runs_dir=str(tmp_path), wandb=True, wandb_mode="offline", tensorboard=True),
                            env={})
    run_dir = tmp_path/"run"
    result = train(cfg, run_dir=run_dir, hooks=tracking_hooks(cfg, run_dir), progress="none")
    assert result.metrics["status"] == "completed"
    ea = EventAccumulator(str(run_dir/"tensorboard")); ea.Reload()
    assert [s.step for s in ea.Scalars("train_loss")] == [1, 2]
    assert [round(s.value, 5) for s in ea.Scalars("val_acc")] == [round(h["val_acc"], 5) for h in result.history]
    offline = list((run_dir/"wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), "wandb wrote no offline run"


def test_missing_tracker_package_is_a_config_error(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg, _ = resolve_config(dict(model="wideresnet10_1", dataset="digits"), env={})
    check_tracking(cfg)  # wandb off: nothing to check
    with pytest.raises(ConfigError, match="pip install wandb"):
        check_tracking(cfg.__class__(**{**cfg.__dict__, "wandb": True}))
