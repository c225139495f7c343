"Expert partitions (expert_lab.experts)."
import matplotlib
matplotlib.use('Agg')
import pytest
import torch

from expert_lab.experts import PARTITIONS, check_partition, expert_partition, partition_counts, plot_partition


def _labels(n=2000, num_classes=100, seed=0):
    "Imbalanced labels with CIFAR-100's structure: 100 fine classes, 20 coarse classes of five."
    g = torch.Generator().manual_seed(seed)
    fine = torch.multinomial(torch.linspace(1, 3, num_classes), n, replacement=True, generator=g)
    coarse_of = torch.randperm(num_classes, generator=g) % 20
    return fine, coarse_of[fine]


def _assert_exact_cover(parts, n):
    allidx = torch.cat(parts)
    assert len(allidx) == n and torch.equal(allidx.sort().values, torch.arange(n))  # disjoint and complete
    assert all(p.dtype == torch.int64 and torch.equal(p, p.sort().values) and len(p) > 0 for p in parts)


@pytest.mark.parametrize('kind', ['iid', 'classes', 'superclass', 'dirichlet'])
@pytest.mark.parametrize('n_experts', [1, 3, 7])
def test_every_index_in_exactly_one_expert(kind, n_experts):
    fine, coarse = _labels()
    parts = expert_partition(fine, n_experts, kind, seed=2, coarse=coarse)
    assert len(parts) == n_experts
    _assert_exact_cover(parts, len(fine))


@pytest.mark.parametrize('kind', PARTITIONS)
def test_deterministic_for_a_seed(kind):
    fine, coarse = _labels()
    a = expert_partition(fine, 4, kind, seed=11, coarse=coarse)
    b = expert_partition(fine, 4, kind, seed=11, coarse=coarse)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    if kind != 'full':
        c = expert_partition(fine, 4, kind, seed=12, coarse=coarse)
        assert any(not torch.equal(p, q) for p, q in zip(a, c))


def test_iid_is_stratified_and_balanced():
    fine, _ = _labels()
    counts = partition_counts(fine, expert_partition(fine, 6, 'iid'), 100)
    assert (counts.max(0).values - counts.min(0).values).max() <= 1
    sizes = counts.sum(1)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(fine)


def test_iid_deals_the_class_grouped_order():
    "iid deals `class_grouped_order` (the validation split's shuffle, seeded alike) to the experts in turn."
    from expert_lab.data import class_grouped_order
    fine, _ = _labels()
    order = class_grouped_order(fine, torch.Generator().manual_seed(4))
    parts = expert_partition(fine, 3, 'iid', seed=4)
    assert all(torch.equal(p, order[k::3].sort().values) for k, p in enumerate(parts))


def test_classes_are_disjoint_and_even():
    fine, _ = _labels()
    counts = partition_counts(fine, expert_partition(fine, 7, 'classes'), 100)
    assert ((counts > 0).sum(0) == 1).all()  # every class with exactly one expert
    per_expert = (counts > 0).sum(1)
    assert per_expert.sum() == 100 and per_expert.max() - per_expert.min() <= 1


def test_superclass_keeps_superclasses_whole():
    fine, coarse = _labels()
    parts = expert_partition(fine, 6, 'superclass', coarse=coarse)
    cc = partition_counts(coarse, parts, 20)
    assert ((cc > 0).sum(0) == 1).all()
    assert sorted((cc > 0).sum(1).tolist()) == [3, 3, 3, 3, 4, 4]
    fc = partition_counts(fine, parts, 100)
    assert ((fc > 0).sum(0) == 1).all()  # so fine classes are disjoint too


@pytest.mark.parametrize('alpha', [0.05, 0.5, 5.0])
def test_dirichlet_min_size_and_skew(alpha):
    fine, _ = _labels()
    parts = expert_partition(fine, 5, 'dirichlet', seed=3, alpha=alpha, min_size=50)
    _assert_exact_cover(parts, len(fine))
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_alpha_controls_skew():
    fine, _ = _labels(4000)
    def top_share(alpha):
        c = partition_counts(fine, expert_partition(fine, 4, 'dirichlet', alpha=alpha, min_size=1), 100).float()
        return (c.max(0).values / c.sum(0)).mean().item()
    small, large = top_share(0.05), top_share(100.0)
    assert small > 0.85 and large < 0.45  # iid would be 0.25 plus noise


def test_full_gives_everyone_everything():
    fine, _ = _labels(300)
    parts = expert_partition(fine, 3, 'full')
    assert all(torch.equal(p, torch.arange(300)) for p in parts)


def test_impossible_settings_raise_early():
    with pytest.raises(ValueError, match="Unknown partition 'shards'; choose one of iid, classes, superclass, dirichlet, full"):
        check_partition('shards', 4)
    with pytest.raises(ValueError, match='n_experts=0'): check_partition('iid', 0)
    with pytest.raises(ValueError, match='n_experts=11 .* has 10'): check_partition('classes', 11, num_classes=10)
    with pytest.raises(ValueError, match='coarse labels'): check_partition('superclass', 4, has_coarse=False)
    with pytest.raises(ValueError, match='n_experts=25'): check_partition('superclass', 25)
    for a in (0, -1.0, float('nan')):
        with pytest.raises(ValueError, match='alpha='): check_partition('dirichlet', 4, alpha=a)
    check_partition('dirichlet', 4, alpha=0.1)
    check_partition('classes', 10, num_classes=10)


def test_impossible_partitions_of_data():
    fine, coarse = _labels(200)
    with pytest.raises(ValueError, match='coarse labels'): expert_partition(fine, 4, 'superclass')
    with pytest.raises(ValueError, match='has 3'): expert_partition(torch.tensor([0, 1, 2, 1]), 4, 'classes')
    with pytest.raises(ValueError, match='empty'): expert_partition(torch.tensor([0, 1, 2]), 4, 'iid')
    with pytest.raises(ValueError, match='need 400 images'): expert_partition(fine, 4, 'dirichlet', min_size=100)
    two = torch.tensor([0] * 50 + [1] * 50)
    with pytest.raises(ValueError, match='fewer than min_size=25'): expert_partition(two, 3, 'dirichlet', alpha=0.01, min_size=25)


def test_partition_counts_and_plot():
    fine, _ = _labels(500, num_classes=10)
    parts = expert_partition(fine, 3, 'iid')
    counts = partition_counts(fine, parts, 10)
    assert counts.shape == (3, 10) and torch.equal(counts.sum(0), torch.bincount(fine, minlength=10))
    ax = plot_partition(counts, [f'c{i}' for i in range(10)])
    assert [t.get_text() for t in ax.get_xticklabels()] == [f'c{i}' for i in range(10)]
    assert [t.get_text() for t in ax.get_yticklabels()] == ['expert 0', 'expert 1', 'expert 2']
    assert ax.collections[0].get_array().reshape(3, 10).tolist() == counts.tolist()


# --- one expert's data, from the labels alone (the launcher's preflight uses this before any run folder exists)
from dataclasses import replace

from expert_lab.config import TrainConfig
from expert_lab.experts import check_batch_fits, expert_split, prepare_expert_data


def _cfg(**kw):
    return TrainConfig(**{**dict(model="wideresnet10_1", dataset="cifar100", n_experts=4, partition="superclass",
                                 device="cpu", val_size=200, batch_size=32), **kw})


def test_expert_split_needs_only_labels_and_never_a_device(monkeypatch):
    fine, coarse = _labels()
    monkeypatch.setattr(torch.Tensor, "to", lambda *a, **k: pytest.fail("expert_split moved a tensor"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda *a, **k: pytest.fail("expert_split moved a tensor"))
    splits = [expert_split(_cfg(expert_id=k), fine, coarse) for k in range(4)]
    val = splits[0][1]
    assert len(val) == 200 and all(torch.equal(s[1], val) for s in splits)  # one validation set for the group
    assert all(torch.equal(s[0], s[2][k]) for k, s in enumerate(splits))
    _assert_exact_cover([*splits[0][2], val], len(fine))  # validation plus the parts: every image exactly once
    sc = partition_counts(coarse, splits[0][2], 20)
    assert ((sc > 0).sum(0) == 1).all()  # superclasses whole, computed on the images left after validation


def test_prepare_expert_data_is_expert_split_of_the_dataset():
    cfg = TrainConfig(model="wideresnet10_1", dataset="digits", n_experts=3, expert_id=2, partition="dirichlet", device="cpu")
    data = prepare_expert_data(cfg)
    tr, val, parts = expert_split(cfg, data.dataset.train_y)
    assert torch.equal(data.train_idx, tr) and torch.equal(data.val_idx, val) and len(data.val_idx) == 144  # default 10%
    assert all(torch.equal(a, b) for a, b in zip(data.parts, parts))


def test_bad_split_settings_fail_with_one_message_naming_the_value():
    fine, coarse = _labels()
    with pytest.raises(ValueError, match="Validation size 5000 is not allowed: use an integer from 0 to 1999"):
        expert_split(_cfg(val_size=5000), fine, coarse)
    with pytest.raises(ValueError, match="needs coarse labels"): expert_split(_cfg(), fine)
    with pytest.raises(ValueError, match="expert 3 has 10 training images, fewer than batch_size=32"):
        check_batch_fits(_cfg(expert_id=3), 10)
    check_batch_fits(_cfg(), 32)
