"Datasets, statistics, the validation split and the device loader (expert_lab.data)."
import pickle, tarfile, urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from expert_lab.data import (DATASETS, DatasetError, DeviceLoader, ImageDataset, channel_stats, check_dataset,
                             class_grouped_order, default_val_size, epoch_seed, load_dataset, validation_split,
                             write_cifar_files)


def _rewrite(path, **changes):
    with open(path, 'rb') as f: d = pickle.load(f, encoding='latin1')
    for k, v in changes.items():
        if callable(v): v(d[k])
        else: d[k] = v
    with open(path, 'wb') as f: pickle.dump(d, f, protocol=2)


def _known_image():
    "A 3x32x32 image with a distinct value pattern per plane, and its bytes in CIFAR's R-plane, G-plane, B-plane order."
    expected = torch.empty(3, 32, 32, dtype=torch.uint8)
    flat = np.empty(3072, np.uint8)
    for c in range(3):
        for r in range(32):
            for col in range(32):
                v = (c*97 + r*31 + col*7 + 5) % 256
                expected[c, r, col] = v
                flat[c*1024 + r*32 + col] = v
    return expected, flat


def test_datasets_names():
    assert DATASETS == ('cifar100', 'cifar10', 'digits', 'folder')


def test_cifar100_byte_layout_round_trip(tmp_path):
    d = write_cifar_files(tmp_path, n_train=30, n_test=10, num_classes=10)
    assert sorted(p.name for p in d.iterdir()) == ['meta', 'test', 'train']
    expected, flat = _known_image()
    def put(data): data[4] = flat
    def relabel(labels): labels[4] = 7
    def recoarse(labels): labels[4] = 19
    _rewrite(d/'train', data=put, fine_labels=relabel, coarse_labels=recoarse)
    ds = load_dataset('cifar100', tmp_path, download=False)
    assert isinstance(ds, ImageDataset)
    assert torch.equal(ds.train_x[4], expected)
    assert ds.train_y[4] == 7 and ds.train_coarse[4] == 19
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (10, 3, 32, 32)
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    assert len(ds.coarse_classes) == 20 and ds.num_classes == 10
    assert len(ds.test_coarse) == 10


def test_cifar10_batches_in_order(tmp_path):
    d = write_cifar_files(tmp_path, n_train=50, n_test=10, num_classes=10, variant='cifar10')
    assert sorted(p.name for p in d.iterdir()) == ['batches.meta'] + [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    expected, flat = _known_image()
    def put(data): data[0] = flat
    _rewrite(d/'data_batch_3', data=put)
    ds = load_dataset('cifar10', tmp_path, download=False)
    assert torch.equal(ds.train_x[20], expected)  # batches 1 and 2 hold 10 images each
    assert ds.train_coarse is None and ds.coarse_classes is None
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)


def test_cifar_python2_bytes_keys(tmp_path):
    "The official files were pickled by Python 2; some readers see their keys and names as bytes."
    d = write_cifar_files(tmp_path, n_train=20, n_test=10, num_classes=10)
    for f in ('train', 'test', 'meta'):
        with open(d/f, 'rb') as fh: obj = pickle.load(fh)
        obj = {k.encode(): ([n.encode() for n in v] if k.endswith('names') else v) for k, v in obj.items()}
        with open(d/f, 'wb') as fh: pickle.dump(obj, fh, protocol=2)
    ds = load_dataset('cifar100', tmp_path, download=False)
    assert ds.classes[0] == 'class_00' and len(ds.train_x) == 20


def test_synthetic_cifar_is_learnable(tmp_path):
    write_cifar_files(tmp_path, n_train=1000, n_test=200, num_classes=20, seed=1)
    ds = load_dataset('cifar100', tmp_path, download=False)
    means = torch.stack([ds.train_x[ds.train_y == k].float().mean(0) for k in range(20)]).flatten(1)
    pred = torch.cdist(ds.test_x.float().flatten(1), means).argmin(1)
    assert (pred == ds.test_y).float().mean() > 0.9  # nearest class mean; chance is 0.05


def test_missing_cifar_offline_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError) as e: load_dataset('cifar100', tmp_path, download=False)
    msg = str(e.value)
    assert str(tmp_path/'cifar-100-python') in msg and 'cifar-100-python.tar.gz' in msg and 'tar xzf' in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__ is False


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U
    def offline(*a, **k): raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(U, 'download_and_extract_archive', offline)
    with pytest.raises(DatasetError) as e: load_dataset('cifar10', tmp_path, download=True)
    msg = str(e.value)
    assert str(tmp_path/'cifar-10-batches-py') in msg and 'Downloading them failed (URLError' in msg
    assert 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz' in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no library traceback chained on


def test_local_archive_is_extracted(tmp_path):
    src = tmp_path/'src'
    write_cifar_files(src, n_train=20, n_test=10, num_classes=10)
    root = tmp_path/'root'; root.mkdir()
    with tarfile.open(root/'cifar-100-python.tar.gz', 'w:gz') as t: t.add(src/'cifar-100-python', arcname='cifar-100-python')
    assert check_dataset('cifar100', root, download=False) == root/'cifar-100-python'
    ds = load_dataset('cifar100', root, download=False)
    assert len(ds.train_x) == 20 and (root/'cifar-100-python'/'meta').is_file()


def test_broken_archive_and_pickle(tmp_path):
    (tmp_path/'cifar-100-python.tar.gz').write_bytes(b'not a tarball')
    with pytest.raises(DatasetError, match='not a readable .tar.gz'): load_dataset('cifar100', tmp_path)
    d = write_cifar_files(tmp_path/'b', n_train=20, n_test=10, num_classes=10)
    (d/'test').write_bytes(b'garbage')
    with pytest.raises(DatasetError, match='test is not a CIFAR python-pickle file'): load_dataset('cifar100', tmp_path/'b')


def test_check_dataset(tmp_path):
    with pytest.raises(DatasetError, match="Unknown dataset 'imagenet'; choose one of cifar100, cifar10, digits, folder"):
        check_dataset('imagenet', tmp_path)
    assert check_dataset('digits', tmp_path) is None
    assert check_dataset('cifar100', tmp_path, download=True) == tmp_path/'cifar-100-python'  # fetched at load time
    with pytest.raises(DatasetError, match='download=False'): check_dataset('cifar100', tmp_path, download=False)
    with pytest.raises(DatasetError, match='train not found'): check_dataset('folder', tmp_path)
    with pytest.raises(DatasetError, match='Unknown dataset'): load_dataset('imagenet', tmp_path)


def test_digits():
    ds = load_dataset('digits')
    assert ds.name == 'digits' and ds.classes == [str(i) for i in range(10)]
    assert ds.train_x.shape == (1438, 3, 32, 32) and ds.test_x.shape == (359, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x[:, 0], ds.train_x[:, 2])  # grey copied to RGB
    share = torch.bincount(ds.test_y, minlength=10) / torch.bincount(torch.cat([ds.train_y, ds.test_y]))
    assert (share - 0.2).abs().max() < 0.02  # stratified 20% test split
    assert ds.mean == channel_stats(ds.train_x)[0] and 0.1 < ds.mean[0] < 0.5
    again = load_dataset('digits')
    assert torch.equal(again.test_x, ds.test_x)  # fixed split


def _write_images(root, split, spec):
    for cls, sizes in spec.items():
        (root/split/cls).mkdir(parents=True, exist_ok=True)
        for i, (size, fmt, mode) in enumerate(sizes):
            im = Image.new(mode, (size, size), color=(10*i + 40) if mode == 'L' else (200, 10*i, 30))
            im.save(root/split/cls/f'{i}.{fmt}')


def test_folder(tmp_path):
    _write_images(tmp_path, 'train', {'cat': [(32, 'png', 'RGB'), (64, 'jpg', 'RGB')], 'dog': [(16, 'png', 'L')], 'notes': []})
    (tmp_path/'train'/'notes'/'readme.txt').write_text('not an image')
    with pytest.raises(DatasetError, match='notes'): load_dataset('folder', tmp_path)
    (tmp_path/'train'/'notes'/'readme.txt').unlink(); (tmp_path/'train'/'notes').rmdir()
    _write_images(tmp_path, 'test', {'dog': [(40, 'jpeg', 'RGB'), (32, 'PNG', 'L')]})
    ds = load_dataset('folder', tmp_path)
    assert ds.classes == ['cat', 'dog']
    assert ds.train_x.shape == (3, 3, 32, 32) and ds.test_x.shape == (2, 3, 32, 32)
    assert ds.train_y.tolist() == [0, 0, 1] and ds.test_y.tolist() == [1, 1]
    assert ds.train_x[0, :, 5, 5].tolist() == [200, 0, 30]
    assert ds.train_x[2, :, 5, 5].tolist() == [40, 40, 40]  # greyscale to RGB
    assert ds.mean == channel_stats(ds.train_x)[0]
    assert check_dataset('folder', tmp_path) == tmp_path


def test_folder_errors(tmp_path):
    _write_images(tmp_path, 'train', {'cat': [(32, 'png', 'RGB')]})
    _write_images(tmp_path, 'test', {'cat': [(32, 'png', 'RGB')]})
    with pytest.raises(DatasetError, match='one class folder'): check_dataset('folder', tmp_path)  # nothing to tell apart
    _write_images(tmp_path, 'train', {'dog': [(32, 'png', 'RGB')]})
    _write_images(tmp_path, 'test', {'cow': [(32, 'png', 'RGB')]})
    with pytest.raises(DatasetError, match='classes that .* lacks: cow'): check_dataset('folder', tmp_path)
    (tmp_path/'test'/'cow'/'0.png').unlink(); (tmp_path/'test'/'cow').rmdir()
    (tmp_path/'train'/'cat'/'broken.png').write_bytes(b'not a png')
    with pytest.raises(DatasetError, match='Cannot read image .*broken.png'): load_dataset('folder', tmp_path)


def test_channel_stats_matches_direct_computation():
    x = torch.randint(0, 256, (300, 3, 6, 6), dtype=torch.uint8)
    mean, std = channel_stats(x, chunk=64)
    f = x.double() / 255
    assert np.allclose(mean, f.mean((0, 2, 3)).numpy(), atol=1e-12)
    assert np.allclose(std, f.std((0, 2, 3), unbiased=False).numpy(), atol=1e-12)


def test_default_val_size():
    assert default_val_size('cifar100', 50_000) == 5000
    assert default_val_size('cifar10', 50_000) == 5000
    assert default_val_size('digits', 1438) == 144
    assert default_val_size('folder', 90) == 9
    with pytest.raises(DatasetError, match="'svhn'"): default_val_size('svhn', 10)


@pytest.mark.parametrize('size', [0, 1, 37, 500, 999])
def test_validation_split_invariants(size):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 13, (1000,), generator=g)
    tr, va = validation_split(labels, size, seed=5)
    assert tr.dtype == va.dtype == torch.int64 and len(va) == size and len(tr) == 1000 - size
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(1000))
    assert torch.equal(tr, tr.sort().values)
    expected = torch.bincount(labels, minlength=13).double() * size / 1000
    assert (torch.bincount(labels[va], minlength=13) - expected).abs().max() < 1  # stratified
    tr2, va2 = validation_split(labels, size, seed=5)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)


def test_validation_split_seed_and_errors():
    labels = torch.arange(500) % 5
    assert not torch.equal(validation_split(labels, 50, 0)[1], validation_split(labels, 50, 1)[1])
    for bad in (500, -3, 2.5):
        with pytest.raises(ValueError, match=f'Validation size {bad}'): validation_split(labels, bad, 0)


def test_class_grouped_order_groups_by_class_and_shuffles_within():
    labels = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(1))
    order = class_grouped_order(labels, torch.Generator().manual_seed(2))
    assert torch.equal(order.sort().values, torch.arange(300))  # a permutation
    assert torch.equal(labels[order], labels.sort().values)  # grouped, classes in increasing order
    again = class_grouped_order(labels, torch.Generator().manual_seed(2))
    other = class_grouped_order(labels, torch.Generator().manual_seed(3))
    assert torch.equal(order, again) and not torch.equal(order, other)
    assert not torch.equal(order, torch.argsort(labels, stable=True))  # shuffled within classes, not index order


def test_validation_split_holds_out_the_head_of_each_class_in_the_grouped_order():
    "The hold-out is the first quota of each class in `class_grouped_order` with the split's seed: one shared shuffle."
    labels = torch.arange(40) % 4
    order = class_grouped_order(labels, torch.Generator().manual_seed(9))
    _, va = validation_split(labels, 8, seed=9)
    assert torch.equal(va, order.view(4, 10)[:, :2].flatten().sort().values)  # 2 of each class's 10, the first two


def test_epoch_seed_is_the_loaders_order():
    x, y = torch.zeros(20, 1, 1, 1, dtype=torch.uint8), torch.arange(20)
    dl = DeviceLoader(x, y, 20, seed=5)
    dl.set_epoch(3)
    want = torch.randperm(20, generator=torch.Generator().manual_seed(epoch_seed(5, 3)))
    assert torch.equal(next(iter(dl))[1], want)
    assert len({epoch_seed(s, e) for s in range(10) for e in range(500)}) == 5000


def test_device_loader_epochs_and_pairing():
    x = torch.arange(103, dtype=torch.int64).view(103, 1, 1, 1).to(torch.uint8)
    y = torch.arange(103)
    dl = DeviceLoader(x, y, 10, seed=3)
    assert len(dl) == 10
    e0 = [yb.clone() for xb, yb in dl]
    assert len(e0) == 10 and all(len(b) == 10 for b in e0)
    assert len(torch.cat(e0).unique()) == 100  # a permutation, last 3 dropped
    e1 = [yb for _, yb in dl]  # next epoch by itself
    assert not torch.equal(torch.cat(e0), torch.cat(e1))
    dl.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(e0, (yb for _, yb in dl)))  # resume sees the same order
    for xb, yb in dl:
        assert xb.dtype == torch.uint8 and yb.dtype == torch.int64
        assert torch.equal(xb.view(-1).long(), yb)
    other = DeviceLoader(x, y, 10, seed=4)
    assert not torch.equal(torch.cat([yb for _, yb in other]), torch.cat(e0))


def test_device_loader_eval_keeps_everything():
    x = torch.zeros(103, 1, 2, 2, dtype=torch.uint8)
    dl = DeviceLoader(x, torch.arange(103), 10, shuffle=False, drop_last=False)
    assert len(dl) == 11
    assert torch.equal(torch.cat([yb for _, yb in dl]), torch.arange(103))
    assert [len(yb) for _, yb in dl][-1] == 3


def test_device_loader_passes_seeded_generator():
    from expert_lab.augment import TrainAugment
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    dl = DeviceLoader(x, torch.zeros(64), 16, seed=1, transform=TrainAugment((0.5,)*3, (0.25,)*3))
    dl.set_epoch(2); a = [xb for xb, _ in dl]
    dl.set_epoch(2); b = [xb for xb, _ in dl]
    c = [xb for xb, _ in dl]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert a[0].dtype == torch.float32 and not torch.equal(a[0], c[0])


def test_device_loader_errors():
    x = torch.zeros(5, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match='batch_size <= 5'): DeviceLoader(x, torch.arange(5), 8)
    with pytest.raises(ValueError, match='4 labels'): DeviceLoader(x, torch.arange(4), 2)
    with pytest.raises(ValueError, match='batch_size=0'): DeviceLoader(x, torch.arange(5), 0)
    assert len(DeviceLoader(x, torch.arange(5), 8, drop_last=False)) == 1
