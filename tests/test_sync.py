"""The training loop reads the device a fixed number of times per epoch, whatever the number of steps: the README's
"the loop reads the device once per epoch", tested.

Every way a tensor's value can reach the host (`.item()`, `.tolist()`, `.numpy()`, `.cpu()`, `bool()`, `float()`,
`int()`, `__index__`) is counted while epochs run; on a GPU each is a host-device synchronisation that stalls the
queue. The counts of a 2-step and a 5-step epoch must be equal. The same check is shown failing on a loop that reads
one value per step, so it cannot pass by counting nothing. With CUDA, torch's own sync detector counts as well."""
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import pytest
import torch
from torch import nn

from expert_lab.experts import prepare_expert_data
from expert_lab.models import create_model
from expert_lab.models.registry import ModelCard, register_model
from expert_lab.train import setup_training, train, train_epoch

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextmanager
def counting_host_reads():
    "Count, by name, every call of `HOST_READS` on any tensor inside the block."
    counts, saved = Counter(), {n: torch.Tensor.__dict__.get(n) for n in HOST_READS}
    def counted(name, orig):
        def read(self, *a, **k):
            counts[name] += 1
            return orig(self, *a, **k)
        return read
    for n in HOST_READS: setattr(torch.Tensor, n, counted(n, getattr(torch.Tensor, n)))
    try: yield counts
    finally:
        for n, f in saved.items():
            if f is None: delattr(torch.Tensor, n)
            else: setattr(torch.Tensor, n, f)


class ReadsEveryStep(nn.Module):
    "wideresnet10_1 that reads its loss-sized output back to the host at every training step, as a careless loop would."
    def __init__(self, num_classes=10, drop_rate=0.0):
        super().__init__(); self.net, self.seen = create_model("wideresnet10_1", num_classes=num_classes), []
    def forward(self, x):
        out = self.net(x)
        if self.training: self.seen.append(out.detach().float().mean().item())
        return out

@pytest.fixture(autouse=True, scope="module")
def own_models():
    "This file's own model, registered only while its tests run (`list_models` elsewhere never sees it)."
    with register_model(ModelCard("_test_reads_every_step", "test", ReadsEveryStep)): yield


def epoch_reads(cfg)->Counter:
    "Host reads during one training epoch of `cfg` (set-up and the first epoch's warm-up are not counted)."
    st = setup_training(cfg, prepare_expert_data(cfg), torch.device(cfg.device))
    train_epoch(st)
    with counting_host_reads() as counts: train_epoch(st)
    return counts


def check_independent_of_steps(reads, cfg, few=2, many=5):
    "Assert the host reads of `reads(cfg)` are the same for `few` and `many` steps per epoch, and that there are some."
    a, b = reads(replace(cfg, steps_per_epoch=few)), reads(replace(cfg, steps_per_epoch=many))
    assert sum(a.values()) > 0, "nothing was counted: the counter is broken"
    assert a == b, f"host reads grow with the steps per epoch: {dict(a)} with {few} steps, {dict(b)} with {many}"
    return a


def test_an_epoch_reads_the_device_a_fixed_number_of_times(tiny):
    counts = check_independent_of_steps(epoch_reads, tiny(ema=True, mixup_alpha=0.2, cutmix_alpha=1.0, random_erasing=0.5,
                                                          grad_clip=1.0))
    assert counts["tolist"] == 1 and sum(counts.values()) <= 3, dict(counts)  # the epoch's one read, and little else


def test_the_check_fails_on_a_read_per_step(tiny):
    with pytest.raises(AssertionError, match="grow with the steps"):
        check_independent_of_steps(epoch_reads, tiny(model="_test_reads_every_step"))


def run_reads(cfg, tmp_path)->Counter:
    "Host reads during a whole `train` (validation, checkpoints and the test set included) of `cfg`, one counter per call."
    with counting_host_reads() as counts: train(cfg, run_dir=tmp_path/f"steps-{cfg.steps_per_epoch}", progress="none")
    return counts


def test_a_whole_run_reads_the_same_for_few_and_many_steps(tiny, tmp_path):
    check_independent_of_steps(partial(run_reads, tmp_path=tmp_path), tiny(epochs=2, ema=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's sync detector needs CUDA")
def test_cuda_sync_detector_agrees(tiny):
    "On a GPU, torch itself reports each synchronisation; a 2-step and an 8-step epoch report the same number."
    def cuda_syncs(steps):
        cfg = tiny(device="cuda", steps_per_epoch=steps, ema=True, deterministic=False)
        st = setup_training(cfg, prepare_expert_data(cfg), torch.device("cuda"))
        train_epoch(st); torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try: train_epoch(st)
            finally: torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)
    few, many = cuda_syncs(2), cuda_syncs(8)
    assert few == many and few >= 1, (few, many)
