"""Training speed of the engine per model: images per second, the time of a 50,000-image epoch (CIFAR-100's training
set), and the model's FLOP/s as a fraction of a bf16 matmul peak measured in the same run; with and without
torch.compile, at batch 128 and 512.

Each configuration runs the engine's own epoch (`setup_training` + `train_epoch`: augmentation on the device, mixup,
autocast, SGD, clipping, schedule) on random uint8 images held on the device: one untimed epoch (compilation, cuDNN
autotuning, allocator warm-up), then one timed epoch of `--steps` steps. FLOPs per image are counted once per model and
batch size with `torch.utils.flop_counter` on a forward and backward pass (convolutions and matmuls; the few
elementwise FLOPs are not counted), so "% peak" is model FLOP utilisation against what this GPU's bf16 matmul reaches.

    .venv/bin/python benchmarks/gpu_epoch.py                      # default models on the GPU, about 5 minutes
    .venv/bin/python benchmarks/gpu_epoch.py --models resnet18,densenet121 --batch-sizes 128
    .venv/bin/python benchmarks/gpu_epoch.py --models wideresnet10_1 --steps 3 --device cpu   # CPU smoke test

On the CPU torch.compile is left out unless `--compile both` (or `on`) is given: inductor's C++ build takes minutes there.
A configuration that runs out of memory is reported as OOM and the others still run; `--budget-s` skips what would not
fit in the time budget.
"""
import argparse, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from torch.utils.flop_counter import FlopCounterMode

from expert_lab.config import TrainConfig, pick_device
from expert_lab.data import ImageDataset
from expert_lab.models import create_model
from expert_lab.experts import ExpertData
from expert_lab.train import setup_training, train_epoch

EPOCH_IMAGES = 50_000
DEFAULT_MODELS = "resnet18,wideresnet28_10"


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize(device)


def matmul_peak(device, n: int, iters: int = 20) -> float:
    "FLOP/s of an n x n x n bf16 matmul on `device`, measured now."
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3): a @ b
    sync(device); t = time.perf_counter()
    for _ in range(iters): a @ b
    sync(device)
    return 2*n**3*iters/(time.perf_counter() - t)


def fake_data(n: int, num_classes: int = 100) -> ExpertData:
    "Random uint8 CIFAR-shaped images: the speed of an epoch does not depend on what the pixels show."
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    ds = ImageDataset("synthetic", x, y, x[:1], y[:1], [str(i) for i in range(num_classes)], (0.5,)*3, (0.25,)*3)
    idx = torch.arange(n)
    return ExpertData(ds, idx, idx[:0], [idx], num_classes)


def train_flops_per_image(model_name: str, batch: int, device) -> tuple[float, float]:
    "FLOPs of one training step (forward and backward) per image, and the parameter count."
    m = create_model(model_name, num_classes=100).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    with FlopCounterMode(display=False) as fc:
        m(x).float().logsumexp(1).mean().backward()
    return fc.get_total_flops()/batch, sum(p.numel() for p in m.parameters())


def time_epoch(model: str, batch: int, compile: bool, steps: int, device) -> float:
    "Images per second of the engine's training epoch, after one untimed warm-up epoch."
    cfg = TrainConfig(model=model, dataset="cifar100", batch_size=batch, steps_per_epoch=steps, compile=compile,
                      device=str(device), epochs=2, precision="auto")
    st = setup_training(cfg, fake_data(batch*steps), device)
    train_epoch(st)  # compile, autotune, warm the allocator
    sync(device); t = time.perf_counter()
    train_epoch(st)  # ends by reading its accumulators, so the device is done when it returns
    sync(device)
    return steps*batch/(time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated model names")
    ap.add_argument("--batch-sizes", default="128,512", help="comma-separated batch sizes")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--compile", default="auto", choices=("auto", "both", "on", "off"),
                    help="torch.compile variants: auto = both on CUDA, off on the CPU")
    ap.add_argument("--matmul-size", type=int, default=0, help="n of the bf16 peak matmul (default 8192 on CUDA, 512 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=300, help="skip configurations once this many seconds have passed")
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    comp = {"both": (False, True), "on": (True,), "off": (False,)}.get(a.compile, (False, True) if device.type == "cuda" else (False,))
    models, batches = a.models.split(","), [int(b) for b in a.batch_sizes.split(",")]
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = matmul_peak(device, a.matmul_size or (8192 if device.type == "cuda" else 512))
    print(f"device: {device} ({name}), torch {torch.__version__}; bf16 matmul peak measured: {peak/1e12:.1f} TFLOP/s")
    if device.type == "cpu" and a.compile == "auto": print("torch.compile left out on the CPU (pass --compile both to include it)")
    print(f"precision: {'bf16 autocast' if device.type == 'cuda' else 'float32'}; {a.steps} timed steps per row\n")
    head = f"{'model':<18} {'compile':>7} {'batch':>5} {'params (M)':>10} {'GFLOP/img':>9} {'img/s':>9} {'50k epoch (s)':>13} {'TFLOP/s':>8} {'% peak':>7}"
    print(head); print("-"*len(head))
    for model in models:
        for batch in batches:
            flops, params = train_flops_per_image(model, batch, device)
            for c in comp:
                row = f"{model:<18} {'yes' if c else 'no':>7} {batch:>5} {params/1e6:>10.2f} {flops/1e9:>9.3f}"
                if time.perf_counter() - t_start > a.budget_s:
                    print(f"{row} {'skipped (time budget)':>41}", flush=True); continue
                try: ips = time_epoch(model, batch, c, a.steps, device)
                except torch.OutOfMemoryError:
                    print(f"{row} {'OOM':>9}", flush=True)
                    if device.type == "cuda": torch.cuda.empty_cache()
                    continue
                finally:
                    if c: torch._dynamo.reset()  # each compiled configuration starts clean
                print(f"{row} {ips:>9.0f} {EPOCH_IMAGES/ips:>13.1f} {ips*flops/1e12:>8.2f} {100*ips*flops/peak:>6.1f}%", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
