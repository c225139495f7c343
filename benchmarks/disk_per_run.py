"""Disk per finished run: what a run's checkpoints/ folder keeps once training is over, against the tested weights.

Each model trains a few short epochs on `digits` on the CPU through the real engine and save path (`train` with a run
folder), with `keep_optimizer` off (the default) and on, without and with EMA. The table gives the bytes of the tested
weights (the state dict the test metrics were measured with), of best.pt and last.pt, of the whole checkpoints/ folder,
and that total as a multiple of the tested weights. Goal, with keep_optimizer off: at most 1.5x.

What decides the figure (see nbs/05a_checkpoint.ipynb, `finished_state`): best.pt holds the tested weights only; a
finished last.pt holds no optimizer state, stores weights best.pt already holds once (1.0x when the last epoch is the
best, or the run stopped early), and keeps final weights that were not tested in float16 because more epochs continue
from them (1.5x). A run with EMA whose best epoch came before its last keeps raw and EMA final weights: 2.0x.

    .venv/bin/python benchmarks/disk_per_run.py                          # about five minutes on 2 cores
    .venv/bin/python benchmarks/disk_per_run.py --models wideresnet10_1  # smoke test
"""
import argparse, sys, tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch

from expert_lab.config import TrainConfig
from expert_lab.files import format_table
from expert_lab.train import train


def run_row(model: str, keep: bool, ema: bool, epochs: int, steps: int) -> dict:
    "Train `model` briefly in a fresh run folder and measure what its checkpoints/ keeps."
    cfg = TrainConfig(model=model, dataset="digits", n_experts=1, partition="iid", device="cpu", epochs=epochs,
                      restart_period=epochs, batch_size=32, lr=0.05, steps_per_epoch=steps, channels_last=False,
                      ema=ema, keep_optimizer=keep, deterministic=True)
    with tempfile.TemporaryDirectory() as d:
        r = train(cfg, run_dir=d, progress="none")
        tested = sum(v.numel()*v.element_size() for v in r.model.state_dict().values())
        size = {p.name: p.stat().st_size for p in (Path(d)/"checkpoints").iterdir()}
    total = sum(size.values())
    m = r.metrics
    return dict(model=model, ema="on" if ema else "off", keep_optimizer="on" if keep else "off",
                best=f"{m['best_epoch']}/{m['epochs_done']} {m['best_weights']}", stop=m["stop_reason"], weights=tested,
                **{"best.pt": size.get("best.pt", 0), "last.pt": size.get("last.pt", 0)}, total=total,
                ratio=f"{total/tested:.2f}x")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "wideresnet16_2"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps per epoch")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [run_row(m, keep, ema, a.epochs, a.steps) for m in a.models for ema in (False, True) for keep in (False, True)]
    print(format_table(rows, ["model", "ema", "keep_optimizer", "best", "stop", "weights", "best.pt", "last.pt", "total", "ratio"]))


if __name__ == "__main__": main()
