"Batched augmentation against torchvision's per-image transforms (expert_lab.augment)."
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from expert_lab.augment import EvalTransform, TrainAugment, mix_batch, normalize, soft_targets
from expert_lab.data import DeviceLoader

CIFAR = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
ID = (0.0,)*3, (1.0,)*3  # normalization that keeps x/255, so outputs can be decoded back to uint8


def _gen(seed): return torch.Generator().manual_seed(seed)


def _coded_image():
    "Red = row + 1, green = column + 1, blue = 200: each pixel says where it came from; padding reads 0."
    i = torch.arange(32)
    return torch.stack([(i[:, None] + 1).expand(32, 32), (i[None] + 1).expand(32, 32), torch.full((32, 32), 200)]).to(torch.uint8)


def _decode(out):
    "Shift (dy, dx) in -4..4 and flip of each output image [B,3,32,32] (uint8) made from `_coded_image`."
    r, c = out[:, 0].long() - 1, out[:, 1].long() - 1
    dy = r[:, 16, 16] - 16
    flip = c[:, 16, 17] < c[:, 16, 16]
    dx = torch.where(flip, c[:, 16, 16] - 15, c[:, 16, 16] - 16)
    return dy, dx, flip


def _to_uint8(y): return (y * 255).round().to(torch.uint8)


def _chi2_uniform(values, k):
    counts = torch.bincount(values, minlength=k).double()
    e = len(values) / k
    return ((counts - e) ** 2 / e).sum().item(), counts


def test_normalize_matches_torchvision():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref = TF.normalize(x.float() / 255, *CIFAR)
    assert torch.allclose(normalize(x, *CIFAR), ref, atol=1e-5)
    assert torch.allclose(EvalTransform(*CIFAR)(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match='std > 0'): normalize(x, *CIFAR[:1], (0.2, 0.0, 0.1))


def test_crop_flip_match_torchvision_pixel_for_pixel():
    img = _coded_image()
    out = _to_uint8(TrainAugment(*ID, erase_p=0)(img.expand(400, 3, 32, 32), generator=_gen(0)))
    dy, dx, flip = _decode(out)
    padded = TF.pad(img, 4)  # torchvision's RandomCrop(32, padding=4): zero padding, then a 32x32 window
    for k in range(400):
        ref = TF.crop(padded, int(dy[k]) + 4, int(dx[k]) + 4, 32, 32)
        if flip[k]: ref = TF.hflip(ref)
        assert torch.equal(out[k], ref), k


def test_crop_offsets_and_flip_rate_match_torchvision():
    img, n = _coded_image(), 8100
    ours = _to_uint8(TrainAugment(*ID, erase_p=0)(img.expand(n, 3, 32, 32), generator=_gen(1)))
    dy, dx, flip = _decode(ours)
    torch.manual_seed(1)
    tv = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()])
    ref = torch.stack([tv(img) for _ in range(n)])
    rdy, rdx, rflip = _decode(ref)
    for a, b in ((dy, rdy), (dx, rdx)):
        assert a.min() == b.min() == -4 and a.max() == b.max() == 4
    # 81 positions, uniform: chi-square with 80 degrees of freedom, 99.9% point 124.8
    chi_ours, counts = _chi2_uniform((dy + 4) * 9 + dx + 4, 81)
    chi_tv, _ = _chi2_uniform((rdy + 4) * 9 + rdx + 4, 81)
    assert (counts > 0).all() and chi_ours < 124.8 and chi_tv < 124.8
    assert abs(flip.float().mean() - 0.5) < 0.02 and abs(rflip.float().mean() - 0.5) < 0.02  # sd 0.0056


def _erased_boxes(out):
    "Per image: erased or not, and the erased box's height and width (erased pixels are exactly 0 in every channel)."
    m = (out == 0).all(1)
    rows, cols = m.any(2), m.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(m.sum((1, 2)), h * w)  # a filled rectangle
    return m.any(2).any(1), h, w


def test_random_erasing_matches_torchvision():
    x = torch.full((6000, 3, 32, 32), 100, dtype=torch.uint8)  # (100/255 - 0.5)/0.25 is never 0
    stats = (0.5,)*3, (0.25,)*3
    out = TrainAugment(*stats, padding=0, flip=False)(x, generator=_gen(2))
    on, h, w = _erased_boxes(out)
    torch.manual_seed(2)
    tv = T.Compose([T.Normalize(*stats), T.RandomErasing(p=0.25)])
    ref = torch.stack([tv(img.float() / 255) for img in x])
    ron, rh, rw = _erased_boxes(ref)
    assert abs(on.float().mean() - 0.25) < 0.02 and abs(ron.float().mean() - 0.25) < 0.02  # sd 0.0056
    # area fraction and aspect ratio: within torchvision's bounds (with its rounding), same distribution
    area, rarea = (h * w)[on] / 1024, (rh * rw)[ron] / 1024
    assert area.min() >= 0.015 and area.max() <= 0.36 and (h[on] < 32).all() and (w[on] < 32).all()
    q = torch.tensor([0.1, 0.5, 0.9])
    assert (torch.quantile(area, q) - torch.quantile(rarea, q)).abs().max() < 0.03
    ratio = (h[on] / w[on]).log()
    assert ratio.min() >= math.log(0.3) - 0.35 and ratio.max() <= math.log(3.3) + 0.35
    assert abs(ratio.mean() - (rh[ron] / rw[ron]).log().mean()) < 0.1
    assert abs(area.mean() - 0.175) < 0.02  # U(0.02, 0.33) has mean 0.175


def test_padding_value_is_zero_before_normalizing():
    x = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    out = TrainAugment(*CIFAR, flip=False, erase_p=0)(x, generator=_gen(3))
    pad = torch.tensor([-m / s for m, s in zip(*CIFAR)]).view(3, 1, 1)
    top = torch.tensor([(1 - m) / s for m, s in zip(*CIFAR)]).view(3, 1, 1)
    is_pad = torch.isclose(out, pad.expand_as(out[0])).all(1)
    assert torch.isclose(out, pad).logical_or(torch.isclose(out, top)).all()
    assert is_pad.any() and not is_pad[:, 12:20, 12:20].any()  # the centre never comes from padding


def test_seed_reproduces_a_batch():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    aug = TrainAugment(*CIFAR)
    assert torch.equal(aug(x, _gen(7)), aug(x, _gen(7)))
    assert not torch.equal(aug(x, _gen(7)), aug(x, _gen(8)))
    torch.manual_seed(3); a = aug(x)
    torch.manual_seed(3); assert torch.equal(a, aug(x))  # global RNG when no generator is given


def test_images_and_labels_stay_paired():
    y = torch.arange(500) % 10
    x = (y * 20 + 10).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 32, 32).contiguous()
    dl = DeviceLoader(x, y, 64, transform=TrainAugment(*ID), seed=4)
    for epoch in range(2):
        for xb, yb in dl:
            # padding and erasing read 0 here; every other pixel is the image's own value, which encodes its label
            assert torch.equal(_to_uint8(xb).amax((1, 2, 3)).long(), yb * 20 + 10)
            assert (_to_uint8(xb)[:, :, 12:20, 12:20] > 0).any()


@pytest.mark.parametrize('mixup, cutmix', [(0.2, 0.0), (1.0, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mix_batch_keeps_pairs_consistent(mixup, cutmix):
    y = torch.arange(64) % 10
    value = torch.linspace(-1, 1, 10)
    x = value[y].view(-1, 1, 1, 1).expand(-1, 3, 16, 16).contiguous()
    t = soft_targets(y, 10)
    for seed in range(5):
        mx, mt = mix_batch(x, t, mixup, cutmix, generator=_gen(seed))
        assert torch.allclose(mx.mean((1, 2, 3)), mt @ value, atol=1e-5)  # each image is its targets' mixture
        assert torch.allclose(mt.sum(1), torch.ones(64))
        assert torch.equal(mx, mix_batch(x, t, mixup, cutmix, generator=_gen(seed))[0])


def test_mix_batch_lambda_follows_beta():
    t = soft_targets(torch.zeros(8, dtype=torch.long), 2)
    t[4:] = soft_targets(torch.ones(4, dtype=torch.long), 2)
    x = torch.zeros(8, 3, 4, 4)
    lams = []
    for s in range(400):
        _, mt = mix_batch(x, t, 0.2, generator=_gen(s))
        lams.append(mt.max(1).values.min().item())  # max(lam, 1-lam) for any mixed pair
    lams = torch.tensor(lams)
    assert (lams >= 0.5).all() and 0.75 < lams.median() < 1.0  # Beta(0.2, 0.2) piles up near 0 and 1


def test_soft_targets_and_errors():
    t = soft_targets(torch.tensor([2, 0]), 4, smoothing=0.2)
    assert torch.allclose(t, torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]]))
    with pytest.raises(ValueError, match='smoothing=-0.1'): soft_targets(torch.tensor([0]), 3, -0.1)
    with pytest.raises(ValueError, match='cutmix_alpha=-1'): mix_batch(torch.zeros(2, 1, 2, 2), t, 0.2, -1)
    with pytest.raises(ValueError, match='erase_p=2'): TrainAugment(*CIFAR, erase_p=2)
    with pytest.raises(ValueError, match='padding=-1'): TrainAugment(*CIFAR, padding=-1)


@pytest.mark.slow
def test_compiled_path_matches_eager():
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8)
    eager, compiled = TrainAugment(*CIFAR), TrainAugment(*CIFAR, compile=True)
    for seed in range(3):
        assert torch.allclose(compiled(x, _gen(seed)), eager(x, _gen(seed)), atol=1e-5)
    assert compiled._compiled is not None  # it really ran compiled, not the eager fallback
