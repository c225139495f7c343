"""Input-pipeline throughput: expert-lab's device-resident loader and batched augmentation against torchvision.

    .venv/bin/python benchmarks/input_pipeline.py                 # CPU, batch 128 and 512, ~2 minutes
    .venv/bin/python benchmarks/input_pipeline.py --seconds 2 --batch-sizes 128 --threads 1
    .venv/bin/python benchmarks/input_pipeline.py --device cuda      # on a GPU machine

Both pipelines read the same CIFAR-sized uint8 array (50,000 random 32x32 RGB images) and produce normalized float
batches with random crop (padding 4), horizontal flip and random erasing (p=0.25), random draws included:

* torchvision: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, RandomErasing(0.25) per image,
  through a DataLoader with 2 workers (PIL images made from the array, as torchvision's CIFAR datasets do);
* expert-lab: DeviceLoader (uint8 data on the device, batches gathered by index) with TrainAugment, eager and
  compiled (torch.compile; its compile time is reported separately and not counted), with 1 and with 2 torch
  threads (on a machine shared with other work, 1 thread often wins: a 2-thread kernel waits for both cores);
  and, for information, the compiled path followed by mixup with soft targets (which torchvision's row does not do).

It prints one table (images/second and the ratio to torchvision at the same batch size) and the memory that holding
CIFAR-100-sized data costs. The machine may be shared: figures vary from run to run.
"""
import argparse, os, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from expert_lab.augment import TrainAugment, mix_batch, soft_targets  # noqa: E402
from expert_lab.data import DeviceLoader  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


def rss_mb():
    "Resident memory of this process, in MB (Linux)."
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024
    return float('nan')


class _TorchvisionSet(torch.utils.data.Dataset):
    def __init__(self, x_hwc, y, tfm): self.x, self.y, self.tfm = x_hwc, y, tfm
    def __len__(self): return len(self.x)
    def __getitem__(self, i):
        from PIL import Image
        return self.tfm(Image.fromarray(self.x[i])), int(self.y[i])


def torchvision_rate(x_hwc, y, batch_size, seconds, workers):
    import torchvision.transforms as T
    tfm = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD),
                     T.RandomErasing(p=0.25)])
    dl = torch.utils.data.DataLoader(_TorchvisionSet(x_hwc, y, tfm), batch_size=batch_size, shuffle=True,
                                     drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    return _rate(lambda: iter(dl), seconds)


def _rate(make_iter, seconds, step=lambda b: b):
    "Images per second over whole batches, after one warm-up batch (worker start, compilation)."
    it = make_iter()
    step(next(it))
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        try: xb, yb = step(next(it))
        except StopIteration: it = make_iter(); continue
        n += len(xb)
    return n / (time.perf_counter() - t0)


def ours_rate(x, y, batch_size, seconds, device, aug, mix=False):
    dl = DeviceLoader(x, y, batch_size, device=device, transform=aug)
    sync = (lambda: torch.cuda.synchronize()) if torch.device(device).type == 'cuda' else (lambda: None)
    gen = torch.Generator(device).manual_seed(0)
    def step(b):
        xb, yb = b
        if mix: xb, _ = mix_batch(xb, soft_targets(yb, 100), 0.2, generator=gen)
        sync()
        return xb, yb
    return _rate(lambda: iter(dl), seconds, step)


def warm_compile(aug, x, batch_size, device):
    t0 = time.perf_counter()
    aug(x[:batch_size].to(device), generator=torch.Generator(device).manual_seed(0))
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[128, 512])
    p.add_argument('--seconds', type=float, default=4.0, help='measuring time per row')
    p.add_argument('--workers', type=int, default=2, help='DataLoader workers for torchvision')
    p.add_argument('--device', default='cpu', help='where expert-lab keeps the data and augments (cpu, cuda)')
    p.add_argument('--no-compile', action='store_true', help='skip the torch.compile rows')
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2],
                   help='torch threads for expert-lab, one set of rows each (on a busy machine 1 is often faster)')
    a = p.parse_args(argv)
    threads0 = torch.get_num_threads()
    print(f'torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device {a.device}')

    rss0 = rss_mb()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    x_test = torch.randint(0, 256, (10_000, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 100, (50_000,), generator=g)
    rss_data = rss_mb()
    # memory first, before torchvision and the compiler load their own code
    torch.set_num_threads(min(a.threads))
    dl = DeviceLoader(x, y, 128, device=a.device, transform=TrainAugment(MEAN, STD))
    for _ in dl: pass  # a whole epoch of augmentation
    rss_epoch = rss_mb()
    del dl
    x_hwc = x.permute(0, 2, 3, 1).contiguous().numpy()  # the layout PIL wants; only the torchvision rows use it

    rows, compile_s = [], {}
    for bs in a.batch_sizes:
        tv = torchvision_rate(x_hwc, y.numpy(), bs, a.seconds, a.workers)
        rows.append(('torchvision + DataLoader', f'{a.workers} worker processes', bs, tv, 1.0))
        for th in a.threads:
            torch.set_num_threads(th)
            eager = ours_rate(x, y, bs, a.seconds, a.device, TrainAugment(MEAN, STD))
            rows.append(('DeviceLoader + TrainAugment', f'eager, {th} thread(s)', bs, eager, eager / tv))
            if a.no_compile: continue
            torch._dynamo.reset()  # compiled kernels are specialised to the thread count
            aug = TrainAugment(MEAN, STD, compile=True)
            compile_s[bs, th] = warm_compile(aug, x, bs, a.device)
            path = f"{'torch.compile' if aug._compiled is not None else 'eager (compile failed)'}, {th} thread(s)"
            comp = ours_rate(x, y, bs, a.seconds, a.device, aug)
            rows.append(('DeviceLoader + TrainAugment', path, bs, comp, comp / tv))
            mixed = ours_rate(x, y, bs, a.seconds, a.device, aug, mix=True)
            rows.append(('  ... + mixup (soft targets)', path, bs, mixed, mixed / tv))
    torch.set_num_threads(threads0)

    print(f"\n{'pipeline':30} {'path':32} {'batch':>5} {'img/s':>10} {'vs torchvision':>15}")
    for name, path, bs, rate, ratio in rows:
        print(f'{name:30} {path:32} {bs:5d} {rate:10,.0f} {ratio:14.1f}x')
    if compile_s: print('\ncompile time (first call, not counted above): ' + ', '.join(f'batch {b}/{t} thread(s): {s:.1f} s' for (b, t), s in compile_s.items()))
    data_mb = (x.nbytes + x_test.nbytes + y.nbytes) / 1e6
    print(f'\nmemory: CIFAR-100-sized data (50,000 train + 10,000 test uint8 images, labels) = {data_mb:.0f} MB; '
          f'the process grew {rss_data - rss0:.0f} MB when it was made, and {rss_epoch - rss_data:.0f} MB more after a '
          f'DeviceLoader went through one augmented epoch of it (a float32 copy of the images would be '
          f'{4 * (x.nbytes + x_test.nbytes) / 1e6:.0f} MB).')
    if torch.device(a.device).type == 'cuda':
        print(f'GPU memory allocated at peak: {torch.cuda.max_memory_allocated() / 1e6:.0f} MB')
    b128 = [r for r in rows if r[2] == 128 and r[1].startswith('torch.compile') and not r[0].startswith(' ')]
    if b128:
        best = max(b128, key=lambda r: r[4])
        print(f'\ngoal: at least 40x at batch 128 -> {best[4]:.1f}x with {best[1]} ({"met" if best[4] >= 40 else "NOT met"})')


if __name__ == '__main__':
    main()
