"""Loop overhead: `expert_lab.train.train` against a minimal plain PyTorch loop doing the same work, on the CPU.

Both sides load the same data (`digits`, one expert holding all of it), build the same tiny model from the same seed,
draw the same batches and augmentation (same seeds), use the same soft-target loss with label smoothing and mixup, the
same SGD kernels, gradient clipping and per-step schedule, and end with the same test-set evaluation. What the engine
adds is its own machinery: device-side loss/accuracy bookkeeping and NaN detection, the stop flag, the progress line,
the epoch record, model-selection logic and hooks. Validation is off on both sides (`val_size=0`) and no checkpoints are
written (no run folder), so the ratio measures the loop's overhead. Goal: engine / plain <= 1.05.

Runs alternate (plain, engine, plain, engine, ...) and the table reports the fastest and the median of each, because
the machine is shared; the ratio of the fastest runs is the figure to quote.

    .venv/bin/python benchmarks/loop_overhead.py                 # about a minute on 2 cores
    .venv/bin/python benchmarks/loop_overhead.py --epochs 1 --repeats 1   # smoke test
"""
import argparse, statistics, sys, time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expert_lab.augment import EvalTransform, TrainAugment, mix_batch, soft_targets
from expert_lab.config import TrainConfig
from expert_lab.data import DeviceLoader
from expert_lab.models import create_model
from expert_lab.experts import prepare_expert_data
from expert_lab.recipe import lr_factor
from expert_lab.data import epoch_seed
from expert_lab.train import train


def plain_loop(cfg: TrainConfig) -> tuple[float, float]:
    "The same training as `train(cfg)`, written as a bare PyTorch loop; returns the test accuracy and loss."
    data = prepare_expert_data(cfg)
    ds, C = data.dataset, data.num_classes
    loader = DeviceLoader(ds.train_x[data.train_idx], ds.train_y[data.train_idx], cfg.batch_size, seed=cfg.seed)
    steps = min(len(loader), cfg.steps_per_epoch) if cfg.steps_per_epoch else len(loader)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=C, drop_rate=cfg.drop_rate)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, steps))
    augment = TrainAugment(ds.mean, ds.std, cfg.crop_padding, cfg.hflip, cfg.random_erasing)
    gen = torch.Generator()
    for epoch in range(cfg.epochs):
        model.train(); loader.set_epoch(epoch); gen.manual_seed(epoch_seed(cfg.seed, epoch + 1))
        for i, (xb, yb) in enumerate(islice(loader, steps)):
            x = augment(xb, generator=gen)
            x, t = mix_batch(x, soft_targets(yb, C, cfg.label_smoothing), cfg.mixup_alpha, cfg.cutmix_alpha, generator=gen,
                             rng=np.random.default_rng((cfg.seed, epoch, i)))
            loss = -(t*F.log_softmax(model(x).float(), -1)).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
            opt.step(); sched.step()
    model.eval()
    correct, loss = torch.zeros((), dtype=torch.long), torch.zeros(())
    test = DeviceLoader(ds.test_x, ds.test_y, 2*cfg.batch_size, shuffle=False, drop_last=False,
                        transform=EvalTransform(ds.mean, ds.std))
    with torch.no_grad():
        for xb, yb in test:
            logits = model(xb).float()
            loss += F.cross_entropy(logits, yb, reduction="sum"); correct += (logits.argmax(1) == yb).sum()
    return correct.item()/len(ds.test_y), loss.item()/len(ds.test_y)


def engine(cfg: TrainConfig) -> tuple[float, float]:
    m = train(cfg, progress="none").metrics
    return m["test_acc"], m["test_loss"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="wideresnet10_1")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each loop")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadiest on a shared machine)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(model=a.model, dataset="digits", n_experts=1, partition="full", val_size=0, epochs=a.epochs,
                      batch_size=a.batch_size, lr=0.05, device="cpu", channels_last=False, drop_rate=0.0, hflip=False)
    engine(TrainConfig(**{**cfg.__dict__, "epochs": 1}))  # warm-up: imports, allocator, dataset cache
    times, acc = {"plain": [], "engine": []}, {}
    for _ in range(a.repeats):
        for name, fn in (("plain", plain_loop), ("engine", engine)):
            t = time.perf_counter(); acc[name] = fn(cfg); times[name].append(time.perf_counter() - t)
    steps = (1294 + 144)//a.batch_size  # digits' 1,438 training images, all with this expert
    print(f"\nloop overhead on the CPU: {a.model}, digits, batch {a.batch_size}, {a.epochs} epochs of {steps} steps, "
          f"{a.threads} thread(s), {a.repeats} alternating runs each\n")
    print(f"{'loop':<8} {'fastest (s)':>12} {'median (s)':>11} {'test acc':>9} {'test loss':>10}")
    for name in ("plain", "engine"):
        print(f"{name:<8} {min(times[name]):>12.3f} {statistics.median(times[name]):>11.3f} {acc[name][0]:>9.4f} {acc[name][1]:>10.6f}")
    ratio, med = min(times["engine"])/min(times["plain"]), statistics.median(times["engine"])/statistics.median(times["plain"])
    print(f"\nratio engine/plain: {ratio:.3f} (fastest runs), {med:.3f} (medians); goal <= 1.05: "
          f"{'met' if ratio <= 1.05 else 'NOT met'}")
    same = acc["plain"][0] == acc["engine"][0] and abs(acc["plain"][1] - acc["engine"][1]) <= 1e-6*abs(acc["plain"][1])
    print(f"same test accuracy and loss (same batches, same arithmetic): {'yes' if same else 'no'}")
    return ratio


if __name__ == "__main__":
    main()
