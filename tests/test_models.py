"""The model zoo: registry, parameter counts against the literature, forward/backward, channels_last, compile."""
import pytest
import torch

from expert_lab.models import (ModelCard, UnknownModelError, create_model, format_model_table, list_models, model_exists,
                               model_table, recipe_defaults, register_model)
from expert_lab.models import count_macs, count_params

# Parameters with a 100-class head, recorded from the reference implementation each model matches (see the family
# notebooks 04a-04d): any change to a block, a stem or a head changes one of these.
REFERENCE_PARAMS = {
    'resnet18': 11_220_132,                 # weiaicunzai/pytorch-cifar100 resnet18
    'resnet34': 21_328_292,                 # weiaicunzai resnet34
    'resnet50': 23_705_252,                 # weiaicunzai resnet50
    'preact_resnet18': 11_217_316,          # kuangliu/pytorch-cifar PreActResNet18
    'wideresnet16_4': 2_772_020,            # xternalz/WideResNet-pytorch WideResNet(16, 100, 4)
    'wideresnet40_2': 2_255_156,            # xternalz WideResNet(40, 100, 2)
    'wideresnet28_10': 36_536_884,          # xternalz WideResNet(28, 100, 10)
    'resnext29_8x64d': 34_518_948,          # facebookresearch/ResNeXt resnext.lua (resnext_C), prlz77/ResNeXt.pytorch
    'resnext29_16x64d': 68_247_460,         # the same, cardinality 16
    'preact_resnext29_8x64d': 34_515_364,   # He et al. pre-activation layout; Xie et al. Table 7: 34.4M (10 classes)
    'preact_resnext29_16x64d': 68_243_876,  # the same, cardinality 16; Table 7: 68.1M (10 classes)
    'densenet121': 7_048_548,               # weiaicunzai densenet121
    'densenet169': 12_643_172,              # weiaicunzai densenet169
    'densenet201': 18_277_220,              # weiaicunzai densenet201
    'densenet_bc100_k12': 800_032,          # gpleiss/efficient_densenet_pytorch DenseNet() = liuzhuang13 BC-100 k=12
    'efficient_densenet': 2_562_880,        # gpleiss DenseNet(block_config=(32, 32, 32))
}
# Where a source prints its own parameter count, the model is within 1% of it (DenseNet authors' table, ResNeXt paper with
# 10 classes, weiaicunzai's README table).
PUBLISHED_PARAMS_M = {
    'densenet_bc100_k12': (0.8, 100), 'preact_resnext29_8x64d': (34.4, 10), 'preact_resnext29_16x64d': (68.1, 10),
    'resnet18': (11.2, 100), 'resnet34': (21.3, 100), 'resnet50': (23.7, 100), 'densenet121': (7.0, 100),
    'densenet201': (18.3, 100), 'wideresnet28_10': (36.5, 10),
}


def meta_model(name, **kw):
    with torch.device('meta'): return create_model(name, **kw)


def test_list_models():
    assert set(list_models()) == set(REFERENCE_PARAMS)  # every registered model has its count pinned
    assert list_models('densenet*') == ['densenet121', 'densenet169', 'densenet201', 'densenet_bc100_k12']


# Each model's recipe defaults, as config's MODEL_DEFAULTS held them before they moved onto the cards (plus the two
# models it missed: densenet_bc100_k12 like the DenseNets, preact_resnext29_16x64d like resnext29_16x64d).
_DENSE, _LARGE = dict(weight_decay=1e-4, drop_rate=0.0), dict(batch_size=64, lr=0.05)
RECIPES = {
    'densenet121': _DENSE, 'densenet169': _DENSE, 'densenet201': _DENSE | _LARGE, 'efficient_densenet': _DENSE | _LARGE,
    'densenet_bc100_k12': _DENSE,
    'resnext29_8x64d': dict(drop_rate=0.0), 'resnext29_16x64d': dict(drop_rate=0.0) | _LARGE,
    'preact_resnext29_8x64d': dict(drop_rate=0.0), 'preact_resnext29_16x64d': dict(drop_rate=0.0) | _LARGE,
}


@pytest.mark.parametrize('name', [*sorted(REFERENCE_PARAMS), 'wideresnet10_1', 'wideresnet22_8'])
def test_recipe_defaults(name):
    assert recipe_defaults(name) == RECIPES.get(name, {})


def test_recipe_defaults_are_copies_and_names_are_checked():
    recipe_defaults('densenet121')['lr'] = 1.0
    assert recipe_defaults('densenet121') == _DENSE
    with pytest.raises(UnknownModelError, match="Did you mean 'densenet121'"): recipe_defaults('densenet12')
    with pytest.raises(ValueError, match=r'6n\+4'): recipe_defaults('wideresnet27_10')


def test_a_test_model_exists_only_inside_its_with_block():
    linear = lambda num_classes, drop_rate: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3*32*32, num_classes))
    card = ModelCard('linear_probe', 'test', linear, recipe=dict(lr=0.5))
    with register_model(card):
        assert 'linear_probe' in list_models() and recipe_defaults('linear_probe') == dict(lr=0.5)
        assert create_model('linear_probe', num_classes=4)(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
        assert 'linear_probe' in [r['name'] for r in model_table(published=False)]  # a family the table does not know
    assert 'linear_probe' not in list_models() and not model_exists('linear_probe')


def test_registering_over_a_name_warns_and_is_undone_too():
    stand_in = ModelCard('resnet18', 'test', lambda num_classes, drop_rate: torch.nn.Identity())
    with pytest.warns(UserWarning, match=r"overwriting 'resnet18' \(resnet, built by expert_lab.models.resnet.CifarResNet\) "
                                         r"with another card \(test, built by (tests\.)?test_models\..*<lambda>\)"):
        reg = register_model(stand_in)
    with reg:
        assert isinstance(meta_model('resnet18'), torch.nn.Identity)
    assert count_params(meta_model('resnet18')) == REFERENCE_PARAMS['resnet18']


def test_registering_the_same_card_again_is_silent(recwarn):
    "What nbdev-test of 04a-04d does: the family's own registrations re-run, as new but equal objects."
    import importlib, warnings
    from functools import partial
    from expert_lab.models import resnet
    from expert_lab.models.registry import model_card
    card = model_card('resnet50')
    again = ModelCard('resnet50', 'resnet', partial(resnet.CifarResNet, resnet.Bottleneck, (3, 4, 6, 3)), card.top1, card.source)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # any warning fails the test
        with register_model(again): assert model_card('resnet50') is again
        with register_model(card): pass  # the very same card
    assert model_card('resnet50') is card
    with pytest.warns(UserWarning, match="overwriting 'resnet50'"):  # one argument differs: another model
        register_model(ModelCard('resnet50', 'resnet', partial(resnet.CifarResNet, resnet.Bottleneck, [3, 4, 6, 4]),
                                 card.top1, card.source)).undo()
    with pytest.warns(UserWarning, match="overwriting 'resnet50'"):  # the same build, another published figure: another card
        register_model(ModelCard('resnet50', 'resnet', card.build, 70.0, card.source)).undo()
    assert model_card('resnet50') is card


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_count(name):
    assert count_params(meta_model(name)) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize('name', sorted(PUBLISHED_PARAMS_M))
def test_published_param_count(name):
    millions, classes = PUBLISHED_PARAMS_M[name]
    assert count_params(meta_model(name, num_classes=classes)) / 1e6 == pytest.approx(millions, rel=0.01)


def test_cifar_stems():
    for name in ['densenet121', 'densenet_bc100_k12', 'efficient_densenet']:  # a bare 3x3 conv, then the first block
        first, second = list(meta_model(name).features.children())[:2]
        assert isinstance(first, torch.nn.Conv2d) and first.kernel_size == (3, 3) and first.stride == (1, 1)
        assert type(second).__name__ == 'DenseBlock'
    assert meta_model('preact_resnet18').norm is None  # kuangliu's: no BN-ReLU after the last block
    assert meta_model('wideresnet16_4').norm is not None  # every WRN reference has one


def test_transition_relu():
    relus = lambda name: [type(t.relu).__name__ for t in meta_model(name).features if type(t).__name__ == 'Transition']
    assert relus('densenet121') == ['Identity'] * 3  # weiaicunzai's transitions: BN-conv-pool
    assert relus('densenet_bc100_k12') == relus('efficient_densenet') == ['ReLU'] * 2  # the authors' and gpleiss's


def test_efficient_densenet(monkeypatch):
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, 'checkpoint', lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    create_model('efficient_densenet')(torch.randn(1, 3, 16, 16)).sum().backward()
    assert len(calls) == 96  # 3 blocks x 32 dense layers, each checkpointed


def test_unknown_model():
    with pytest.raises(UnknownModelError) as e: create_model('resnet19')
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "Did you mean 'resnet18'" in msg and all(n in msg for n in list_models())
    assert 'wideresnet<depth>_<width>' in msg
    assert not model_exists('resnet19') and model_exists('resnet18')


def test_wide_resnet_by_name():
    assert model_exists('wideresnet22_8') and 'wideresnet22_8' not in list_models()
    assert count_params(meta_model('wideresnet22_8')) / 1e6 == pytest.approx(17.2, rel=0.01)  # WRN-22-8, paper
    assert not model_exists('wideresnet27_10')
    with pytest.raises(ValueError, match=r'6n\+4'): create_model('wideresnet27_10')


def test_drop_rate_placement():
    wrn = meta_model('wideresnet16_4', drop_rate=0.3)  # inside every block, none in the head
    assert [b.drop.p for b in wrn.stages] == [0.3] * 6 and wrn.head.drop.p == 0
    for name in ['resnet18', 'preact_resnet18', 'resnext29_8x64d', 'densenet121', 'efficient_densenet']:
        m = meta_model(name, drop_rate=0.3)  # before the classifier, nowhere else
        assert m.head.drop.p == 0.3
        assert [d.p for d in m.modules() if isinstance(d, torch.nn.Dropout) and d.p] == [0.3]


def test_init():
    m = create_model('resnet18', zero_init_residual=True)
    conv = m.layer2[0].conv1  # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * k * k))
    assert conv.weight.std().item() == pytest.approx((2 / (128 * 9)) ** 0.5, rel=0.05)
    assert m.layer1[0].bn1.weight.eq(1).all() and m.layer1[0].bn1.bias.eq(0).all()
    assert all(b.bn2.weight.eq(0).all() for layer in [m.layer1, m.layer4] for b in layer)
    wrn = create_model('wideresnet16_4', zero_init_residual=True)  # pre-activation: the branch's last conv
    assert all(b.conv2.weight.eq(0).all() for b in wrn.stages)
    with torch.no_grad():
        x = torch.randn(2, 64, 32, 32)
        torch.testing.assert_close(wrn.stages[1](x), x)  # identity block at init
    with pytest.raises(ValueError, match='no residual'): meta_model('densenet121', zero_init_residual=True)


def check_forward_backward(name, memory_format=torch.contiguous_format):
    torch.manual_seed(0)
    m = create_model(name).to(memory_format=memory_format)
    y = m(torch.randn(2, 3, 32, 32).to(memory_format=memory_format))
    assert y.shape == (2, 100)
    y.logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())


@pytest.mark.parametrize('name', [*list_models(), 'wideresnet10_1'])
def test_forward_backward(name): check_forward_backward(name)


# one model per kind of block: torchvision's basic and grouped bottleneck, pre-activation basic and bottleneck,
# the dense layer and its checkpointed version
@pytest.mark.parametrize('name', ['resnet18', 'resnext29_8x64d', 'wideresnet16_4', 'preact_resnext29_8x64d',
                                  'densenet121', 'efficient_densenet'])
def test_channels_last(name): check_forward_backward(name, torch.channels_last)


def test_model_table():
    rows = model_table()
    assert [r['name'] for r in rows] and sorted(r['name'] for r in rows) == list_models()
    row = next(r for r in rows if r['name'] == 'resnet18')
    assert row['family'] == 'resnet' and row['params'] == count_params(meta_model('resnet18'))
    assert row['macs'] / 1e9 == pytest.approx(0.56, rel=0.02) and row['top1'] == 75.61
    # only sourced figures: no column of this project's own accuracy until a run of it measures one
    assert set(rows[0]) == {'name', 'family', 'params', 'macs', 'top1', 'source'}
    assert all(r['source'] != 'not published' for r in rows)
    plain, md = format_model_table(rows).splitlines(), format_model_table(rows, markdown=True).splitlines()
    assert len(plain) == len(rows) + 1 and len(md) == len(rows) + 2  # plain: files.format_table, a header line
    assert plain[0].split()[:2] == ['model', 'family'] and plain[1].split()[:2] == [rows[0]['name'], rows[0]['family']]
    assert all(l.startswith('| ') and l.endswith(' |') for l in md) and md[1].startswith('| --- |')
    assert set(model_table(published=False)[0]) == {'name', 'family', 'params', 'macs'}


def test_count_macs_meta_equals_cpu():
    m = create_model('wideresnet16_4').eval()
    assert count_macs(m) == count_macs(meta_model('wideresnet16_4').eval())


@pytest.mark.slow
def test_compile():
    torch.manual_seed(0)
    m, x = create_model('wideresnet16_4', num_classes=10), torch.randn(2, 3, 32, 32)
    compiled = torch.compile(m)
    y = compiled(x)
    torch.testing.assert_close(y, m(x), rtol=1e-3, atol=1e-3)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


@pytest.mark.slow
def test_readme_model_table_is_the_cards():
    "The README's model table is `expert-lab models --markdown`, line for line: figures come from the cards only."
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1]/"README.md").read_text()
    table = format_model_table(model_table(), markdown=True).strip().splitlines()
    assert [l for l in table if l not in readme] == []


# --- the post-activation ResNet and DenseNet are torchvision's networks, written out (importing torchvision costs every
# fresh kernel seconds): the same state-dict keys and shapes, and torchvision's weights give the same outputs
def _torchvision_twin(name:str)->torch.nn.Module:
    "torchvision's network for a zoo name, with the zoo's CIFAR stem swapped in and its head left as it is."
    import torchvision.models.densenet as tvd, torchvision.models.resnet as tvr
    from torch import nn
    if name.startswith('densenet'):
        blocks = {'densenet121': (6, 12, 24, 16), 'densenet_bc100_k12': (16, 16, 16)}[name]
        growth, stem = (32, 64) if name == 'densenet121' else (12, 24)
        m = tvd.DenseNet(growth, blocks, stem, num_classes=100)
        m.features.conv0 = nn.Conv2d(3, stem, 3, padding=1, bias=False)
        del m.features.norm0, m.features.relu0, m.features.pool0
        if name == 'densenet121':  # weiaicunzai's transitions have no ReLU
            for t in m.features:
                if isinstance(t, tvd._Transition): t.relu = nn.Identity()
        return m
    block, layers, kw = {'resnet18': (tvr.BasicBlock, [2, 2, 2, 2], {}), 'resnet50': (tvr.Bottleneck, [3, 4, 6, 3], {}),
                         'resnext29_8x64d': (tvr.Bottleneck, [3, 3, 3, 1], dict(groups=8, width_per_group=64))}[name]
    m = tvr.ResNet(block, layers, num_classes=100, **kw)
    m.conv1, m.maxpool = nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.Identity()
    if name.startswith('resnext'): m.layer4 = nn.Identity()  # three stages
    return m


def _twin_features(tv, x):
    if hasattr(tv, 'features'): return tv.features(x).relu()
    x = tv.relu(tv.bn1(tv.conv1(x)))
    return tv.layer4(tv.layer3(tv.layer2(tv.layer1(x))))


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnext29_8x64d', 'densenet121', 'densenet_bc100_k12'])
def test_torchvision_weights_give_the_same_outputs(name):
    torch.manual_seed(0)
    ours, tv = create_model(name).eval(), _torchvision_twin(name).eval()
    tv_body = {k: v for k, v in tv.state_dict().items() if not k.startswith(('fc.', 'classifier.'))}
    ours_body = {k: v for k, v in ours.state_dict().items() if not k.startswith('head.')}
    assert {k: v.shape for k, v in ours_body.items()} == {k: v.shape for k, v in tv_body.items()}
    for m in tv.modules():  # BatchNorm statistics away from 0/1, so a wrong order of BN and conv shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2); m.running_var.uniform_(0.5, 1.5); m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
    ours.load_state_dict({**tv.state_dict(), **{k: v for k, v in ours.state_dict().items() if k.startswith('head.')}}, strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(ours.forward_features(x), _twin_features(tv, x))


def test_a_run_imports_only_what_it_uses():
    """A fresh process that builds the models and trains (as each report's kernel does) imports no torchvision,
    scikit-learn, SciPy or seaborn: each costs a run's kernel seconds before its first epoch. (torch._dynamo it does
    import: torch.optim's optimizers load it on their first param group.)"""
    import subprocess, sys
    code = ("import sys; from expert_lab.models import create_model\n"
            "[create_model(n) for n in ('resnet18', 'resnext29_8x64d', 'densenet_bc100_k12', 'wideresnet16_4')]\n"
            "import expert_lab.runs; expert_lab.runs.provenance()\n"
            "from expert_lab.config import TrainConfig; from expert_lab.train import train\n"
            "train(TrainConfig(model='wideresnet10_1', dataset='digits', n_experts=1, partition='full', epochs=1,\n"
            "                  steps_per_epoch=2, batch_size=32, device='cpu'), progress='none')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('torchvision', 'sklearn', 'seaborn', 'scipy')}))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]', out.stdout
