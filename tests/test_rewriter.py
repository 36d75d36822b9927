"""The rewriter: placement fidelity from what actually runs, kept weights, errors, meta device, sizes."""
from typing import Dict, List

import pytest
import timm
import torch
import torch.nn as nn

from timm_ic import rewrite
from timm_ic.layers import Uout
from timm_ic.models import BASELINES, ResidualBlock

DROPOUTS = (nn.Dropout, Uout)
NORMS = (nn.BatchNorm2d,)
ACTS = (nn.ReLU,)
POOLS = (nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.AvgPool2d)


class DataFlow:
    """Which module produced each module's input, recorded with forward hooks during one real forward pass.

    Leaf modules only, Identity and empty Sequentials skipped (they pass their input through, so the producer
    stays the real one).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.names = {m: n for n, m in model.named_modules()}
        self.producer_of_input: Dict[str, str] = {}
        self.order: List[str] = []
        produced_by: Dict[int, str] = {id(x): 'input'}
        keep = [x]  # hold every tensor so ids are never reused
        handles = []

        def hook(module, args, output):
            name = self.names[module]
            self.order.append(name)
            self.producer_of_input[name] = produced_by.get(id(args[0]), '?')
            produced_by[id(output)] = name
            keep.append(output)

        for m in model.modules():
            if not list(m.children()) and not isinstance(m, (nn.Identity, nn.Sequential)):  # empty: pass-through
                handles.append(m.register_forward_hook(hook))
        model.train()
        model(x)
        for h in handles:
            h.remove()
        self.modules = {n: m for m, n in self.names.items()}

    def producer(self, name: str) -> nn.Module:
        return self.modules.get(self.producer_of_input[name])

    def chain(self, name: str, length: int) -> List[nn.Module]:
        """The modules that fed `name`, nearest first; pooling and flattening are looked through."""
        out = []
        while len(out) < length:
            name = self.producer_of_input.get(name, '?')
            module = self.modules.get(name)
            if not isinstance(module, (*POOLS, nn.Flatten)):
                out.append(module)
        return out


SKELETONS = {
    'cifar_basic': lambda p: timm.create_model('cifar_resnet20', placement=p),
    'cifar_bottleneck': lambda p: timm.create_model('cifar_resnet164', placement=p),
    'timm_resnet18': lambda p: rewrite(timm.create_model('resnet18'), p),
    'timm_resnet50': lambda p: rewrite(timm.create_model('resnet50'), p),
    'timm_resnetv2_50': lambda p: rewrite(timm.create_model('resnetv2_50'), p),
    'densenet_bc': lambda p: timm.create_model('cifar_densenet_bc100', placement=p),
    'timm_densenet121': lambda p: rewrite(timm.create_model('densenet121'), p),
}


def run(skeleton: str, placement: str) -> (nn.Module, DataFlow):
    torch.manual_seed(0)
    model = SKELETONS[skeleton](placement)
    size = 32 if skeleton.startswith(('cifar', 'densenet')) else 64
    return model, DataFlow(model, torch.randn(2, 3, size, size))


def weight_layers(model: nn.Module, flow: DataFlow):
    stem = {n for n, _ in model.stem.named_modules(prefix='stem')}
    return [n for n in flow.order if isinstance(flow.modules[n], (nn.Conv2d, nn.Linear)) and n not in stem]


@pytest.mark.parametrize('skeleton', list(SKELETONS))
def test_ic_every_weight_layer_but_the_stem_follows_act_norm_drop(skeleton):
    model, flow = run(skeleton, 'ic')
    layers = weight_layers(model, flow)
    assert len(layers) > 10
    for name in layers:
        drop, norm, act = flow.chain(name, 3)  # the head pools between norm and dropout: looked through
        assert isinstance(drop, nn.Dropout), (name, drop)
        assert isinstance(norm, NORMS), (name, norm)
        assert isinstance(act, ACTS), (name, act)


@pytest.mark.parametrize('skeleton', ['cifar_basic', 'cifar_bottleneck', 'timm_resnet50', 'timm_resnetv2_50'])
def test_kim_one_dropout_per_branch_after_last_norm_act_before_last_conv(skeleton):
    model, flow = run(skeleton, 'kim')
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]
    assert blocks
    for block_name, block in blocks:
        drops = [n for n in flow.order if n.startswith(block_name + '.') and isinstance(flow.modules[n], DROPOUTS)]
        assert len(drops) == 1, (block_name, drops)
        last_conv = f'{block_name}.units.{len(block.units) - 1}.conv'
        drop, act, norm = flow.chain(last_conv, 3)
        assert drop is flow.modules[drops[0]]
        assert isinstance(act, ACTS) and isinstance(norm, NORMS)
        later_norms = [n for n in flow.order[flow.order.index(drops[0]):]
                       if n.startswith(block_name + '.') and isinstance(flow.modules[n], NORMS)]
        assert not later_norms, f'{block_name}: a norm runs after the dropout inside the branch'
    # head: dropout on the feature map, before global pooling
    assert flow.producer('global_pool.pool') is model.head_drop_pre and isinstance(model.head_drop_pre, nn.Dropout)


@pytest.mark.parametrize('skeleton', ['cifar_basic', 'timm_resnet50', 'densenet_bc'])
def test_after_bn_no_dropout_runs_before_any_norm(skeleton):
    model, flow = run(skeleton, 'after_bn')
    norms = [i for i, n in enumerate(flow.order) if isinstance(flow.modules[n], NORMS)]
    drops = [i for i, n in enumerate(flow.order) if isinstance(flow.modules[n], DROPOUTS)]
    assert drops and norms and max(norms) < min(drops)
    assert flow.producer('fc') is model.head_drop


@pytest.mark.parametrize('skeleton', ['cifar_basic', 'cifar_bottleneck', 'timm_resnet18'])
def test_before_bn_dropout_feeds_the_last_norm_of_each_block(skeleton):
    model, flow = run(skeleton, 'before_bn')
    for block_name, block in model.named_modules():
        if isinstance(block, ResidualBlock):
            last = f'{block_name}.units.{len(block.units) - 1}'
            assert isinstance(flow.producer(f'{last}.post.norm'), nn.Dropout)
            assert flow.producer(f'{last}.post.drop') is flow.modules[f'{last}.conv']


def test_uout_placement_puts_uout_in_the_drop_slots():
    model, flow = run('densenet_bc', 'pre:drop=uout,beta=0.1')
    convs = weight_layers(model, flow)
    assert all(isinstance(flow.producer(n), Uout) for n in convs if isinstance(flow.modules[n], nn.Conv2d))


NORM_PASS_THROUGH = (*ACTS, *POOLS, *DROPOUTS)


def norms_fed_by_norms(flow: DataFlow) -> List[str]:
    """The norms whose input comes from another norm through activations, pooling and dropout only."""
    found = []
    for name in flow.order:
        if not isinstance(flow.modules[name], NORMS):
            continue
        producer = flow.producer_of_input.get(name, '?')
        while isinstance(flow.modules.get(producer), NORM_PASS_THROUGH):
            producer = flow.producer_of_input.get(producer, '?')
        if isinstance(flow.modules.get(producer), NORMS):
            found.append(f'{producer} -> {name}')
    return found


@pytest.mark.parametrize('placement', ['pre', 'ic', 'post'])
@pytest.mark.parametrize('skeleton', ['cifar_basic', 'timm_resnet50', 'timm_resnetv2_50', 'densenet_bc'])
def test_no_unit_sees_two_norms_in_a_row(skeleton, placement):
    model, flow = run(skeleton, placement)
    assert not norms_fed_by_norms(flow)


def test_densenet_stem_keeps_its_norm_act_only_under_its_own_unit_order():
    # ImageNet DenseNet's own design is conv-BN-ReLU-pool: kept under BN-ReLU-conv units, where the first dense
    # layer's BN follows it as in DenseNet; under IC's ReLU-BN units the stem has no norm, so no double norm
    model, flow = run('timm_densenet121', 'ic')
    assert not norms_fed_by_norms(flow) and list(model.stem._modules) == ['conv']
    model, flow = run('timm_densenet121', 'pre')
    assert norms_fed_by_norms(flow) == ['stem.norm -> stages.0.0.units.0.pre.norm']
    # the family's stem survives a rewrite chain; a ResNet's does not come back
    assert 'norm' in rewrite(rewrite(timm.create_model('densenet121'), 'post'), 'pre').stem._modules
    assert 'norm' not in rewrite(rewrite(timm.create_model('resnet18'), 'post'), 'pre').stem._modules


@pytest.mark.parametrize('name, timm_name', [('ic_resnet50', 'resnetv2_50'), ('kim_resnet50', 'resnetv2_50'),
                                             ('ic_resnet18', 'resnetv2_18')])
def test_imagenet_preact_models_have_no_stem_norm(name, timm_name):
    # timm's ResNetV2 convention: stem conv then pool, the first unit normalizes; the same parameter count
    with torch.device('meta'):
        model, ref = timm.create_model(name), timm.create_model(timm_name)
        pre = rewrite(timm.create_model(BASELINES[name]), 'pre')
    count = [sum(p.numel() for p in m.parameters()) for m in (model, ref, pre)]
    assert count[0] == count[1] == count[2], count
    assert list(model.stem._modules) == ['conv'] and list(pre.stem._modules) == ['conv']


@pytest.mark.parametrize('skeleton', ['cifar_basic', 'cifar_bottleneck', 'timm_resnet50'])
def test_kim_on_post_activation_blocks_drops_before_the_last_conv(skeleton):
    # Kim et al.'s position in a post-activation branch: conv-BN-ReLU-Dropout-conv-BN, then the sum and ReLU
    model, flow = run(skeleton, 'kim:order=conv-norm-act-drop')
    assert not model.placement.preact
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]
    for block_name, block in blocks:
        drops = [n for n in flow.order if n.startswith(block_name + '.') and isinstance(flow.modules[n], DROPOUTS)]
        assert len(drops) == 1, (block_name, drops)
        last = f'{block_name}.units.{len(block.units) - 1}'
        drop, act, norm = flow.chain(f'{last}.conv', 3)
        assert drop is flow.modules[drops[0]] and isinstance(act, ACTS) and isinstance(norm, NORMS)
        assert flow.producer(f'{last}.post.norm') is flow.modules[f'{last}.conv']  # no dropout after the last BN
    assert flow.producer('global_pool.pool') is model.head_drop_pre


def test_kim_on_a_post_activation_timm_resnet_keeps_every_norm():
    torch.manual_seed(0)
    source = timm.create_model('resnet18').eval()
    model = rewrite(source, 'kim:order=conv-norm-act-drop').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # every BN stays where it was; dropouts are off in eval
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize('name', ['resnet50', 'resnext50_32x4d', 'wide_resnet50_2', 'seresnet50', 'resnet26d'])
def test_post_rewrite_of_timm_resnet_is_exact(name):
    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    model = rewrite(source, 'post').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


@pytest.mark.parametrize('name', ['resnetv2_50', 'densenet121'])
def test_pre_rewrite_of_timm_preact_family_matches(name):
    # both are pre-activation already; DenseNet's stem keeps its own norm-act before the pool
    torch.manual_seed(0)
    source = timm.create_model(name).eval()
    for m in source.modules():  # non-trivial statistics, so that kept norms matter
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2)
    model = rewrite(source, 'pre').eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-4, atol=1e-4)


def test_rewrite_keeps_every_conv_and_the_classifier():
    source = timm.create_model('resnet50')
    model = rewrite(source, 'ic')
    kept = {id(p) for p in model.parameters()}
    convs = [m for m in source.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 53 and all(id(c.weight) in kept for c in convs)
    assert model.fc is source.fc
    # a pre-activation placement drops the stem's norm-act (bn1): stem conv, then the pool (timm's ResNetV2)
    assert list(model.stem._modules) == ['conv'] and all(m is not source.bn1 for m in model.modules())
    assert rewrite(source, 'post').stem.norm is source.bn1
    # norms moved to the input side of each conv: new, fresh statistics
    assert model.stages[0][0].units[0].pre.norm.num_features == 64
    assert model.stages[0][0].units[0].pre.norm.running_var.eq(1).all()


def test_rewrite_chain_round_trips_weights():
    model = timm.create_model('cifar_resnet20')
    convs = [id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)]
    twice = rewrite(rewrite(model, 'ic'), 'post')
    assert [id(m.weight) for m in twice.modules() if isinstance(m, nn.Conv2d)] == convs
    assert str(twice.placement) == 'post'


def test_rewritten_model_keeps_timm_api():
    source = timm.create_model('resnet18', num_classes=7)
    model = rewrite(source, 'kim')
    x = torch.randn(2, 3, 64, 64)
    assert model.forward_head(model.forward_features(x)).shape == (2, 7)
    assert model.get_classifier() is model.fc and model.pretrained_cfg['classifier'] == 'fc'
    assert model.pretrained_cfg['first_conv'] == 'stem.conv' and model.pretrained_cfg['architecture'] == 'resnet18'
    assert [f['reduction'] for f in model.feature_info] == [2, 4, 8, 16, 32]
    model.set_grad_checkpointing(True)
    model.train()(x).mean().backward()
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_rewrite_works_on_meta_device():
    with torch.device('meta'):
        source = timm.create_model('resnet152')
    model = rewrite(source, 'ic:drop=uout,beta=0.2')
    assert {p.device.type for p in model.parameters()} == {'meta'}
    assert model(torch.empty(1, 3, 224, 224, device='meta')).shape == (1, 1000)


def test_unsupported_model_names_the_supported_families():
    with pytest.raises(ValueError, match='supported families: timm ResNet'):
        rewrite(nn.Sequential(nn.Conv2d(3, 8, 3)), 'ic')
    with torch.device('meta'):
        vit = timm.create_model('vit_tiny_patch16_224')
    with pytest.raises(ValueError, match='VisionTransformer'):
        rewrite(vit, 'ic')


def test_unsupported_block_features_are_refused_not_skipped():
    with torch.device('meta'):
        source = timm.create_model('resnet18', drop_block_rate=0.1)
    with pytest.raises(ValueError, match='DropBlock'):
        rewrite(source, 'ic')


def test_placement_that_cannot_apply_names_the_setting_and_layer():
    with pytest.raises(ValueError, match=r'cannot apply at stem: groups=48 does not divide 64 channels'):
        rewrite(timm.create_model('resnet18'), 'post:norm=groupnorm,groups=48')
    with pytest.raises(ValueError, match=r'cannot apply at stages\.0\.0: groups=48 does not divide 64 channels'):
        rewrite(timm.create_model('resnetv2_50'), 'pre:norm=groupnorm,groups=48')


def test_every_registered_model_is_in_a_baseline_pair():
    models = set(timm.list_models(module=['ic_resnet', 'ic_densenet']))
    paired = set(BASELINES) | set(BASELINES.values())
    # only the Wide ResNets no paper placement is built on (README's table) stand alone
    assert models - paired == {'cifar_wrn16_8', 'cifar_wrn40_4'}
    assert all(timm.is_model(n) for n in paired)
    # a baseline has no paper placement (a pre-activation baseline may have its own post-activation baseline)
    assert not {b for b in BASELINES.values() if b.startswith(('ic_', 'kim_', 'uout_'))}


@pytest.mark.parametrize('name', sorted(n for n in BASELINES if n.startswith('kim_')))
def test_kim_models_pair_with_the_baseline_readme_names(name):
    # README's zoo table: timm resnet* for the ImageNet skeleton, cifar_preresnet* for the pre-activation CIFAR
    # ResNet (Kim et al.'s baseline is pre-activation), cifar_wrn28_10 for the WRN
    expected = {'kim_resnet50': 'resnet50', 'kim_preresnet110': 'cifar_preresnet110', 'kim_wrn28_10': 'cifar_wrn28_10'}
    assert BASELINES[name] == expected[name]
    with torch.device('meta'):
        model, baseline = timm.create_model(name), timm.create_model(BASELINES[name])
    if hasattr(baseline, 'placement'):  # the same network but for the dropouts
        undropped = model.placement.replace(drop='none', drop_rate=0.0, head='none', head_rate=0.0)
        assert undropped.order == baseline.placement.order and undropped.norm == baseline.placement.norm
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in baseline.parameters())


@pytest.mark.parametrize('name, baseline', sorted(BASELINES.items()))
def test_parameter_count_within_one_percent_of_baseline(name, baseline):
    with torch.device('meta'):
        n = sum(p.numel() for p in timm.create_model(name).parameters())
        b = sum(p.numel() for p in timm.create_model(baseline).parameters())
    assert abs(n - b) / b < 0.01, (n, b)
