"""Hub: export (safetensors + config.json + card), push, and pretrained loading, offline.

A tiny ic_resnet20 is trained for a few SGD steps on the embedded digits and written as a train.py run folder.
In-process tests check the export, its card, `local-dir:` loading and the error messages. The Hub tests
push to `hub_server.FakeHub` (a loopback server speaking the Hub's HTTP protocol) from a fresh process,
because huggingface_hub reads HF_ENDPOINT / HF_HUB_CACHE / HF_HUB_OFFLINE / HF_HUB_DISABLE_XET at import.
"""
import dataclasses
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub import ModelCard

import timm_ic
import timm_ic.hub as hub
from timm_ic.run_record import RunRecord
from hub_server import FakeHub, _model_index_errors

REPO_ROOT = Path(__file__).resolve().parents[1]
ARCH = 'ic_resnet20'
PLACEMENT = 'ic:drop=uout,beta=0.1'
TAG = f'{ARCH}.demo_digits'
INPUT_SIZE = (1, 16, 16)


def _digits_tensors(split: str):
    from timm_ic.data import DigitsDataset
    ds = DigitsDataset(split)
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 255.0
    x = F.interpolate(x, size=INPUT_SIZE[1:], mode='bilinear', align_corners=False)
    return (x - 0.3053) / 0.3759, torch.tensor(ds.targets)


def _folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory) -> Path:
    """A train.py-style run folder: run.json (schema timm_ic.run_record/1 subset) + best.safetensors, plus
    reference inputs and logits of the trained model."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH, num_classes=10, in_chans=1, placement=PLACEMENT)
    x, y = _digits_tensors('train')
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(8):
        idx = torch.randint(0, len(y), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    xv, yv = _digits_tensors('val')
    with torch.no_grad():
        logits = model(xv)
    top5 = logits.topk(5, dim=1).indices
    top1_acc = (top5[:, 0] == yv).float().mean().item() * 100
    top5_acc = (top5 == yv[:, None]).any(dim=1).float().mean().item() * 100
    out = tmp_path_factory.mktemp('run')
    safetensors.torch.save_file(model.state_dict(), str(out / 'best.safetensors'))
    RunRecord(
        status='finished', model=ARCH, placement=str(model.placement),
        model_args={'num_classes': 10, 'in_chans': 1, 'placement': PLACEMENT},
        num_classes=10, in_chans=1, label_names=[str(i) for i in range(10)],
        pretrained_cfg=dict(model.pretrained_cfg),
        data_config={'input_size': list(INPUT_SIZE), 'interpolation': 'bilinear', 'mean': [0.3053],
                     'std': [0.3759], 'crop_pct': 1.0, 'crop_mode': 'center'},
        dataset={'name': 'digits', 'data_dir': None, 'train_split': 'train', 'val_split': 'validation'},
        recipe={'name': 'digits_demo', 'path': str(out / 'digits_demo.yaml'), 'values': {'lr': 0.05}},
        args={'model': ARCH, 'lr': 0.05, 'output': str(out)},
        versions={'timm': timm.__version__, 'torch': torch.__version__},
        metrics={'epoch': 1, 'top1': top1_acc, 'top5': top5_acc, 'loss': 1.0},
    ).write(out / 'run.json')
    safetensors.torch.save_file({'x': xv[:16].contiguous(), 'logits': logits[:16].contiguous()},
                                str(out / 'reference.safetensors'))
    return out


@pytest.fixture(scope='module')
def reference(run_dir):
    return safetensors.torch.load_file(str(run_dir / 'reference.safetensors'))


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory) -> Path:
    return hub.export(run_dir, tmp_path_factory.mktemp('exports') / 'ic20', repo_id='testorg/ic_resnet20-digits')


# ------------------------------------------------------------------------------------------------------------
# export and card
# ------------------------------------------------------------------------------------------------------------

def test_export_config_rebuilds_the_exact_model(exported, run_dir):
    assert sorted(p.name for p in exported.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    placement = timm_ic.Placement.parse(config['model_args']['placement'])
    assert placement == timm_ic.Placement.parse(PLACEMENT) and placement.drop == 'uout'
    # only real PretrainedCfg fields: timm raises TypeError on others
    fields = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
    assert set(config['pretrained_cfg']) <= fields
    assert config['pretrained_cfg']['input_size'] == list(INPUT_SIZE)
    assert config['pretrained_cfg']['mean'] == [0.3053]
    assert config['pretrained_cfg']['hf_hub_filename'] == 'model.safetensors'
    # trained at 16x16, not ic_resnet20's 32x32: the 32x32 cfg's 8x8 pool size does not describe these weights
    assert timm.create_model(ARCH).pretrained_cfg['pool_size'] == (8, 8)
    assert 'pool_size' not in config['pretrained_cfg']
    # the weights are the run's, bit for bit
    saved = safetensors.torch.load_file(str(exported / 'model.safetensors'))
    trained = safetensors.torch.load_file(str(run_dir / 'best.safetensors'))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_card_parses_and_holds_only_measured_numbers(exported, run_dir):
    text = (exported / 'README.md').read_text()
    card = ModelCard(text)
    record = json.loads((run_dir / 'run.json').read_text())
    assert card.data.library_name == 'timm' and card.data.pipeline_tag == 'image-classification'
    assert {'image-classification', 'timm', 'timm_ic', 'placement-ic'} <= set(card.data.tags)
    assert card.data.license == 'apache-2.0'
    assert card.data.datasets is None  # the digits are not a Hub dataset: no made-up id
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {'accuracy': round(record['metrics']['top1'], 3),
                       'top_5_accuracy': round(record['metrics']['top5'], 3)}
    assert _model_index_errors(card.data.to_dict()['model-index']) == []
    model = timm.create_model(ARCH, num_classes=10, in_chans=1, placement=PLACEMENT)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert f'Params (M): {params_m:.3g}' in text
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, *INPUT_SIZE))
    assert f'GMACs: {counter.get_total_flops() / 2e9:.3g}' in text
    assert f'`{timm_ic.Placement.parse(PLACEMENT)}`' in text and model.placement.describe() in text
    usage = text[text.index('## Model Usage'):]
    assert usage.index('import timm_ic') < usage.index("timm.create_model('hf-hub:testorg/ic_resnet20-digits'")
    for section in ('## Model Details', '### Feature Map Extraction', '### Image Embeddings',
                    '## Training Recipe', '## Citation', 'arXiv:1905.05928'):
        assert section in text
    assert str(run_dir) not in text  # no local paths in a public card


def test_card_names_real_hub_dataset(tmp_path):
    model = timm.create_model(ARCH, num_classes=10)
    out = hub.export(model, tmp_path / 'c10', dataset='c10', metrics={'top1': 12.5, 'top5': 51.0})
    card = ModelCard((out / 'README.md').read_text())
    assert card.data.datasets == ['uoft-cs/cifar10']
    assert card.data.eval_results[0].dataset_type == 'uoft-cs/cifar10'
    # no run record, no numbers: an export without metrics has no model-index
    bare = hub.export(model, tmp_path / 'bare')
    assert ModelCard((bare / 'README.md').read_text()).data.eval_results is None


def test_export_is_atomic(exported, tmp_path, monkeypatch):
    # a folder that is not an export is never replaced
    other = tmp_path / 'notes'
    other.mkdir()
    (other / 'keep.txt').write_text('mine')
    model = timm.create_model(ARCH, num_classes=10)
    with pytest.raises(FileExistsError, match='holds no export'):
        hub.export(model, other)
    assert (other / 'keep.txt').read_text() == 'mine'
    # a failure while writing leaves the previous export as it was, and no temporary folder behind
    target = tmp_path / 'export'
    hub.export(model, target)
    before = _folder_digest(target)

    def broken_save(*args, **kwargs):
        raise OSError('disk full')
    monkeypatch.setattr(safetensors.torch, 'save_file', broken_save)
    with pytest.raises(OSError, match='disk full'):
        hub.export(timm.create_model(ARCH, num_classes=10), target)
    assert _folder_digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export', 'notes']


def test_run_record_errors_name_the_file(run_dir, tmp_path):
    with pytest.raises(hub.RunRecordError, match='run.json not found'):
        hub.export(tmp_path, tmp_path / 'out')
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'run.json').write_text('{"model": ')
    with pytest.raises(hub.RunRecordError, match=r'run\.json is not valid JSON'):
        hub.read_run(bad)
    RunRecord(model='ic_resnet20').write(bad / 'run.json')
    with pytest.raises(hub.RunRecordError, match='no weights'):
        hub.read_run(bad)
    # weights of another model than the record says
    RunRecord(model='ic_resnet56', num_classes=10, in_chans=1).write(bad / 'run.json')
    (bad / 'best.safetensors').write_bytes((run_dir / 'best.safetensors').read_bytes())
    with pytest.raises(hub.RunRecordError, match=r'best\.safetensors does not match'):
        hub.export(bad, tmp_path / 'out')


def test_run_record_reader_refuses_what_it_does_not_understand(run_dir, tmp_path):
    record = json.loads((run_dir / 'run.json').read_text())
    assert RunRecord.read(run_dir / 'run.json').to_json() == record  # what it writes, it reads back unchanged
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'best.safetensors').write_bytes((run_dir / 'best.safetensors').read_bytes())
    for changed, message in (
            ({'schema': 'timm_ic.run_record/2'}, r"schema 'timm_ic.run_record/2'; this timm-ic reads "
                                                 r"'timm_ic.run_record/1'"),
            ({'schema': None}, r'no "schema" field'),
            ({'model': None}, r'no model name \(field "model"\)'),
            ({'best': {'eval_top1': 50.0}}, r'fields timm_ic.run_record/1 does not define: best'),
            ({'num_classes': '10'}, r'field "num_classes" must be an integer or null, got str'),
            ({'epochs': {}}, r'field "epochs" must be a list, got dict')):
        (bad / 'run.json').write_text(json.dumps({k: v for k, v in {**record, **changed}.items() if v is not None}))
        with pytest.raises(hub.RunRecordError, match=message) as e:
            hub.export(bad, tmp_path / 'out')
        assert str(bad / 'run.json') in str(e.value)
    (bad / 'run.json').write_text('[1, 2]')
    with pytest.raises(hub.RunRecordError, match='must hold a JSON object, got list'):
        hub.read_run(bad)
    assert not (tmp_path / 'out').exists()


def test_export_refuses_a_placement_its_architecture_cannot_rebuild(tmp_path):
    # timm_ic.rewrite keeps resnet18's pretrained_cfg: config.json would call resnet18(placement=...)
    rewritten = timm_ic.rewrite(timm.create_model('resnet18', num_classes=10), 'ic')
    with pytest.raises(ValueError, match=r"architecture 'resnet18' is not registered by timm-ic") as e:
        hub.export(rewritten, tmp_path / 'rewritten')
    assert "timm.create_model('ic_resnet18', num_classes=10, placement='ic')" in str(e.value)
    assert 'source model' in str(e.value) and not (tmp_path / 'rewritten').exists()
    # the fix the message gives exports, and loads back with the same outputs
    fixed = timm.create_model('ic_resnet18', num_classes=10, placement='ic')
    fixed.load_state_dict(rewritten.state_dict())
    out = hub.export(fixed, tmp_path / 'fixed')
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
        assert torch.allclose(loaded(x), rewritten.eval()(x), atol=1e-5)


def _hand_made_run(run_dir: Path, folder: Path, **changes) -> Path:
    folder.mkdir()
    record = json.loads((run_dir / 'run.json').read_text())
    record.update(changes)
    (folder / 'run.json').write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    (folder / 'best.safetensors').write_bytes((run_dir / 'best.safetensors').read_bytes())
    return folder


def test_run_fine_tuned_from_hub_or_tag_exports_its_architecture(run_dir, reference, tmp_path):
    # train.py records --model as given; the model's pretrained_cfg names the architecture
    cfg = json.loads((run_dir / 'run.json').read_text())['pretrained_cfg']
    assert cfg['architecture'] == ARCH
    from_hub = _hand_made_run(run_dir, tmp_path / 'hub', model='hf-hub:testorg/ic20-digits')
    out = hub.export(from_hub, tmp_path / 'out')
    assert json.loads((out / 'config.json').read_text())['architecture'] == ARCH
    with torch.no_grad():
        assert torch.allclose(timm.create_model(f'local-dir:{out}', pretrained=True).eval()(reference['x']),
                              reference['logits'], atol=1e-5)
    # a tagged name without an architecture in its cfg: the name without its tag
    tagged = _hand_made_run(run_dir, tmp_path / 'tagged', model=f'{ARCH}.some_tag',
                            pretrained_cfg={k: v for k, v in cfg.items() if k != 'architecture'})
    assert hub.read_run(tagged)['model'] == ARCH
    assert hub.model_from_run(tagged).placement == timm_ic.Placement.parse(PLACEMENT)
    local = _hand_made_run(run_dir, tmp_path / 'local', model='local-dir:/models/ic20', pretrained_cfg=None)
    with pytest.raises(hub.RunRecordError, match=r"names model 'local-dir:/models/ic20' and its pretrained_cfg "
                                                 'records no architecture'):
        hub.read_run(local)


def test_citations_follow_architecture_and_placement(tmp_path):
    li, chen, kim, ioffe = '1801.05134', '1905.05928', '2302.06112', '1502.03167'
    # cifar_resnet20 names no placement paper: the placement brings its own
    assert hub.cards.papers_for('cifar_resnet20') == [ioffe, '1512.03385']
    for placement, cited, not_cited in (('kim', {kim}, {chen, li}), ('ic', {chen}, {kim, li}),
                                        ('post:drop=uout,beta=0.1', {li}, {chen, kim}),
                                        ('after_bn', {li}, {chen, kim}), ('before_bn', {li}, {chen, kim}),
                                        (timm_ic.Placement.parse(PLACEMENT), {chen, li}, {kim}),
                                        ('post', set(), {chen, kim, li})):
        papers = hub.cards.papers_for('cifar_resnet20', placement=placement)
        assert cited <= set(papers) and not set(papers) & not_cited, (placement, papers)
        assert papers[:2] == [ioffe, '1512.03385']  # the architecture's first
    # a Uout card cites Li et al., in the card and in the pretrained_cfg
    model = timm.create_model('cifar_resnet20', num_classes=10, placement='post:drop=uout,beta=0.1')
    out = hub.export(model, tmp_path / 'uout')
    text = (out / 'README.md').read_text()
    citation = text[text.index('## Citation'):]
    assert 'li2019understanding' in citation and 'chen2019rethinking' not in citation
    assert f'https://arxiv.org/abs/{li}' in text
    assert f'arXiv:{li}' in json.loads((out / 'config.json').read_text())['pretrained_cfg']['paper_ids']


# ------------------------------------------------------------------------------------------------------------
# local-dir loading and its errors
# ------------------------------------------------------------------------------------------------------------

def test_local_dir_rebuilds_model_with_timm_options(exported, reference):
    model = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    assert model.placement == timm_ic.Placement.parse(PLACEMENT)
    assert model.pretrained_cfg['label_names'] == [str(i) for i in range(10)]
    with torch.no_grad():
        assert torch.allclose(model(reference['x']), reference['logits'], atol=1e-5)
    # a new head: the classifier is re-initialised, everything else is the export's
    five = timm.create_model(f'local-dir:{exported}', pretrained=True, num_classes=5)
    assert five.get_classifier().out_features == 5
    assert torch.equal(five.stem.conv.weight, model.stem.conv.weight)
    # 3 input channels from 1: timm adapts the first conv (repeats and rescales it)
    rgb = timm.create_model(f'local-dir:{exported}', pretrained=True, in_chans=3).eval()
    with torch.no_grad():
        assert torch.allclose(rgb(reference['x'].expand(-1, 3, -1, -1)), reference['logits'], atol=1e-4)
    features = timm.create_model(f'local-dir:{exported}', pretrained=True, features_only=True).eval()
    with torch.no_grad():
        maps = features(reference['x'])
        expected = model.forward_intermediates(reference['x'], intermediates_only=True)
    assert len(maps) == len(expected) and all(torch.allclose(a, b) for a, b in zip(maps, expected))


@pytest.fixture
def broken_copy(exported, tmp_path):
    copy = tmp_path / 'copy'
    copy.mkdir()
    for p in exported.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    return copy


def test_truncated_weights_name_the_file(broken_copy):
    weights = broken_copy / 'model.safetensors'
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(hub.PretrainedWeightsError, match='corrupt or truncated') as e:
        hub.create_model(f'local-dir:{broken_copy}', pretrained=True)
    assert str(weights) in str(e.value)
    # timm.create_model reaches timm-ic's entrypoint, which gives the same message
    with pytest.raises(hub.PretrainedWeightsError, match='corrupt or truncated') as e:
        timm.create_model(f'local-dir:{broken_copy}', pretrained=True)
    assert str(weights) in str(e.value)


def test_unknown_architecture_and_shape_mismatch_are_explained(broken_copy):
    config_path = broken_copy / 'config.json'
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, 'architecture': 'no_such_net'}))
    with pytest.raises(hub.PretrainedWeightsError, match="'no_such_net', which is not registered") as e:
        hub.create_model(f'local-dir:{broken_copy}', pretrained=True)
    assert str(config_path) in str(e.value)
    # weights of a ResNet-20 under a config that says ResNet-56
    config_path.write_text(json.dumps({**config, 'architecture': 'ic_resnet56'}))
    for create in (hub.create_model, timm.create_model):
        with pytest.raises(hub.PretrainedWeightsError, match='does not fit the model ic_resnet56') as e:
            create(f'local-dir:{broken_copy}', pretrained=True)
        assert str(broken_copy / 'model.safetensors') in str(e.value)


def test_only_safetensors_are_loaded(broken_copy, tmp_path):
    (broken_copy / 'model.safetensors').rename(broken_copy / 'pytorch_model.bin')
    with pytest.raises(hub.PretrainedWeightsError, match='safetensors only'):
        timm.create_model(f'local-dir:{broken_copy}', pretrained=True)
    with pytest.raises(hub.PretrainedWeightsError, match='safetensors only'):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / 'w.pth')))


# ------------------------------------------------------------------------------------------------------------
# pretrained tags from hub_cards
# ------------------------------------------------------------------------------------------------------------

def _write_cards(folder: Path, published: bool = False) -> Path:
    cards = yaml.safe_load((REPO_ROOT / 'hub_cards' / 'models.yaml').read_text())
    cards['models'] = {TAG: {'hf_hub_id': 'ic20-digits', 'published': published, 'dataset': 'digits',
                             'recipe': 'digits_demo', 'license': 'apache-2.0'}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'models.yaml').write_text(yaml.safe_dump(cards))
    return folder


def test_pretrained_cfgs_follow_hub_cards_and_namespace(tmp_path, monkeypatch):
    monkeypatch.setenv(hub.HUB_CARDS_ENV, str(_write_cards(tmp_path / 'cards')))
    monkeypatch.delenv(hub.HUB_NAMESPACE_ENV, raising=False)
    cfg = hub.pretrained_cfgs(ARCH)['demo_digits']
    assert 'hf_hub_id' not in cfg  # never published: no hub id
    assert cfg['input_size'] == INPUT_SIZE and cfg['num_classes'] == 10 and cfg['mean'] == (0.3053,)
    monkeypatch.setenv(hub.HUB_NAMESPACE_ENV, 'my-team')  # read at call time
    cfg = hub.pretrained_cfgs(ARCH)['demo_digits']
    assert cfg['hf_hub_id'] == 'my-team/ic20-digits' and cfg['hf_hub_filename'] == 'model.safetensors'
    assert hub.hub_repo_id(TAG) == 'my-team/ic20-digits'
    monkeypatch.delenv(hub.HUB_NAMESPACE_ENV)
    monkeypatch.setenv(hub.HUB_CARDS_ENV, str(_write_cards(tmp_path / 'published', published=True)))
    assert hub.pretrained_cfgs(ARCH)['demo_digits']['hf_hub_id'] == 'timm-ic/ic20-digits'
    assert hub.pretrained_cfgs('ic_resnet56') == {}
    # a typo in the cards file is an error naming the file and the entry
    cards = yaml.safe_load((tmp_path / 'published' / 'models.yaml').read_text())
    cards['models'][TAG]['datset'] = 'digits'
    (tmp_path / 'published' / 'models.yaml').write_text(yaml.safe_dump(cards))
    with pytest.raises(ValueError, match=r"models\.yaml has problems:\n  ic_resnet20\.demo_digits: unknown fields"):
        hub.pretrained_cfgs(ARCH)


def test_wheel_ships_hub_cards(tmp_path, monkeypatch):
    """hub_cards/ stays at the repository root and is installed as timm_ic.hub.hub_cards (pyproject.toml)."""
    import tomllib
    from setuptools import find_namespace_packages
    config = tomllib.loads((REPO_ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
    # the explicit package list misses no package under timm_ic/
    assert set(config['packages']) == set(find_namespace_packages(str(REPO_ROOT), include=['timm_ic*'])) | {
        'timm_ic.hub.hub_cards'}
    assert config['package-dir'] == {'timm_ic.hub.hub_cards': 'hub_cards'}
    patterns = config['package-data']['timm_ic.hub.hub_cards']
    assert all(any(p.match(g) for g in patterns) for p in (REPO_ROOT / 'hub_cards').iterdir())
    # one place, where the wheel installs the data package: in the checkout a link to the root's hub_cards/
    from timm_ic.models import tags
    monkeypatch.delenv(hub.HUB_CARDS_ENV, raising=False)
    assert hub.hub_cards_dir() == tags.HUB_CARDS_DIR == Path(hub.cards.__file__).resolve().parent / 'hub_cards'
    link = REPO_ROOT / 'timm_ic' / 'hub' / 'hub_cards'
    assert link.is_symlink() and os.readlink(link) == '../../hub_cards' and link.resolve() == REPO_ROOT / 'hub_cards'
    assert hub.load_hub_cards()['models'] == yaml.safe_load((REPO_ROOT / 'hub_cards' / 'models.yaml').read_text())['models']


def test_repository_hub_cards_are_valid_and_registered():
    cards = hub.load_hub_cards()
    for name, entry in cards['models'].items():
        arch = name.split('.')[0]
        assert timm.is_model(arch), f'{name}: {arch} is not a registered model'
        hub_id = cards['datasets'][entry['dataset']]['hub_id']
        assert hub_id is None or hub_id.count('/') == 1
        assert set(hub.cards.papers_for(arch)) <= set(cards['papers'])
        # the registry's tags are exactly hub_cards' (the model files build their cfgs from it)
        assert name in timm.list_models(arch, include_tags=True), f'{name} is not in timm registry'
        assert entry['published'] or name not in timm.list_pretrained(f'{arch}.*') or os.environ.get(hub.HUB_NAMESPACE_ENV)


def test_unpublished_tag_fails_at_once_saying_how_to_get_weights():
    with pytest.raises(hub.PretrainedWeightsError) as e:
        timm.create_model('ic_resnet50.sgd90_in1k', pretrained=True)
    message = str(e.value)
    assert 'never published' in message and 'train.py' in message and 'timm-ic push' in message
    assert 'pretrained_cfg_overlay=dict(file=' in message and hub.HUB_NAMESPACE_ENV in message


# ------------------------------------------------------------------------------------------------------------
# the Hub, end to end, in fresh processes
# ------------------------------------------------------------------------------------------------------------

_HUB_SCRIPT = textwrap.dedent('''
    import json, sys, traceback
    from pathlib import Path
    import safetensors.torch, timm, torch
    import timm_ic, timm_ic.hub as hub
    export_dir, repo_id, dead_endpoint, out_file = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    ref = safetensors.torch.load_file(sys.argv[5])
    results = {}

    def logits_match(model):
        with torch.no_grad():
            return bool(torch.allclose(model.eval()(ref['x']), ref['logits'], atol=1e-5))

    def attempt(key, fn):
        try:
            results[key] = fn()
        except Exception as e:
            results[key] = {'error': type(e).__name__, 'message': str(e)}

    if sys.argv[6] == 'online':
        attempt('push', lambda: hub.push(export_dir, repo_id).oid)
        attempt('push_pr', lambda: hub.push(export_dir, repo_id, create_pr=True).pr_revision)
        attempt('down', lambda: hub.push(export_dir, 'testorg/other', endpoint=dead_endpoint))
        attempt('unauthorized', lambda: hub.push(export_dir, 'testorg/other', token='hf_wrong'))
        attempt('no_revision', lambda: hub.push(export_dir, repo_id, revision='no-such-branch'))
        attempt('push_run', lambda: hub.push_run(sys.argv[7], 'testorg/from-run').oid)
    attempt('by_tag', lambda: logits_match(timm.create_model('ic_resnet20.demo_digits', pretrained=True)))
    attempt('by_hf_hub', lambda: logits_match(timm.create_model(f'hf-hub:{repo_id}', pretrained=True)))
    attempt('hf_hub_new_head', lambda: timm.create_model(f'hf-hub:{repo_id}', pretrained=True,
                                                         num_classes=3).get_classifier().out_features)
    attempt('hf_hub_features', lambda: len(timm.create_model(f'hf-hub:{repo_id}', pretrained=True,
                                                             features_only=True)(ref['x'])))
    attempt('missing_repo', lambda: hub.create_model('hf-hub:testorg/never-pushed', pretrained=True))
    Path(out_file).write_text(json.dumps(results))
''')


def _run_hub_script(tmp: Path, env_extra: dict, mode: str, export_dir: Path, run_dir: Path,
                    dead_endpoint: str = 'http://127.0.0.1:9') -> dict:
    reference_file = run_dir / 'reference.safetensors'
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGING'))}
    env.update({'HF_HUB_DISABLE_XET': '1', 'HF_HUB_CACHE': str(tmp / 'cache'), 'HF_HOME': str(tmp / 'home'),
                'HF_HUB_DISABLE_TELEMETRY': '1', 'HF_HUB_DISABLE_PROGRESS_BARS': '1', **env_extra})
    out_file = tmp / f'results-{mode}.json'
    proc = subprocess.run(
        [sys.executable, '-c', _HUB_SCRIPT, str(export_dir), 'testorg/ic20-digits', dead_endpoint, str(out_file),
         str(reference_file), mode, str(run_dir)],
        env=env, cwd=str(REPO_ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {**json.loads(out_file.read_text()), '_stdout': proc.stdout}


@pytest.fixture(scope='module')
def hub_session(run_dir, tmp_path_factory):
    """Push the run to a fake Hub and load it back, online; then offline with the server stopped."""
    tmp = tmp_path_factory.mktemp('hub')
    cards = _write_cards(tmp / 'cards')
    export_dir = hub.export(run_dir, tmp / 'export', repo_id='testorg/ic20-digits', tag=TAG)
    with socket.socket() as s:  # a port nothing listens on: the 'network down' case
        s.bind(('127.0.0.1', 0))
        dead_endpoint = f'http://127.0.0.1:{s.getsockname()[1]}'
    env = {hub.HUB_CARDS_ENV: str(cards), hub.HUB_NAMESPACE_ENV: 'testorg', 'HF_TOKEN': 'hf_fake_token'}
    before = _folder_digest(export_dir)
    with FakeHub(token='hf_fake_token') as server:
        online = _run_hub_script(tmp, {**env, 'HF_ENDPOINT': server.url}, 'online', export_dir, run_dir,
                                 dead_endpoint)
        files = server.files('testorg/ic20-digits')
        run_files = server.files('testorg/from-run')
        num_commits = len(server.repos['testorg/ic20-digits'].commits)
        endpoint = server.url
    # the server is gone: everything must come from the cache
    offline = _run_hub_script(tmp, {**env, 'HF_ENDPOINT': endpoint, 'HF_HUB_OFFLINE': '1'}, 'offline',
                              export_dir, run_dir)
    return {'online': online, 'offline': offline, 'files': files, 'num_commits': num_commits, 'run_files': run_files,
            'export_dir': export_dir, 'export_before': before}


@pytest.mark.slow  # hub_session: ~20 s of Hub scripts in subprocesses
def test_push_then_load_by_registry_tag_and_hf_hub(hub_session):
    online, files = hub_session['online'], hub_session['files']
    assert isinstance(online['push'], str) and len(online['push']) == 40, online['push']
    assert f"commit {online['push']}" in online['_stdout'] and '/testorg/ic20-digits' in online['_stdout']
    export_dir = hub_session['export_dir']
    assert {k: files[k] for k in ('model.safetensors', 'config.json', 'README.md')} == {
        p.name: p.read_bytes() for p in export_dir.iterdir()}
    assert online['push_pr'] == 'refs/pr/1'
    # train.py --push-to-hub: the run folder exported to run_dir/hub_export, then pushed
    assert isinstance(online['push_run'], str), online['push_run']
    assert hub_session['run_files']['model.safetensors'] == files['model.safetensors']
    assert b'testorg/from-run' in hub_session['run_files']['README.md']
    assert online['by_tag'] is True, online['by_tag']
    assert online['by_hf_hub'] is True, online['by_hf_hub']
    assert online['hf_hub_new_head'] == 3 and online['hf_hub_features'] == 4
    assert online['missing_repo']['error'] == 'PretrainedWeightsError'
    assert 'hf-hub:testorg/never-pushed' in online['missing_repo']['message']


@pytest.mark.slow  # hub_session: ~20 s of Hub scripts in subprocesses
def test_push_failures_say_why_and_keep_the_export(hub_session):
    online = hub_session['online']
    for key, words in (('down', ('could not reach the Hub',)),
                       ('unauthorized', ('HTTP 401', 'hf auth login')),
                       ('no_revision', ('HTTP 404', "'no-such-branch'", 'does not exist'))):
        assert online[key]['error'] == 'HubPushError', online[key]
        assert all(w in online[key]['message'] for w in words), online[key]['message']
        assert 'is unchanged' in online[key]['message']
    assert _folder_digest(hub_session['export_dir']) == hub_session['export_before']
    assert hub_session['num_commits'] == 3  # the repo's initial commit, the push, the pull request


@pytest.mark.slow  # hub_session: ~20 s of Hub scripts in subprocesses
def test_offline_load_from_cache(hub_session):
    offline = hub_session['offline']
    assert offline['by_tag'] is True, offline['by_tag']
    assert offline['by_hf_hub'] is True, offline['by_hf_hub']
    assert offline['missing_repo']['error'] == 'PretrainedWeightsError'
    assert 'not in the local Hub cache' in offline['missing_repo']['message']


# ------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------

def test_cli_export_and_push_failure(run_dir, tmp_path, capsys):
    from timm_ic.cli import main
    out = tmp_path / 'cli_export'
    assert main(['export', str(run_dir), str(out), '--repo-id', 'testorg/cli']) == 0
    assert ModelCard((out / 'README.md').read_text()).data.model_name == 'testorg/cli'
    assert main(['export', str(tmp_path / 'nothing'), str(tmp_path / 'x')]) == 2
    assert 'is not a folder' in capsys.readouterr().err
    assert main(['push', str(tmp_path / 'nothing'), 'testorg/cli']) == 2
    assert 'nothing' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# nothing lost, nothing broken published (issue 11)
# ------------------------------------------------------------------------------------------------------------

def _strict_json(text: str):
    """json.loads that rejects bare NaN / Infinity, as JSON readers other than Python's do."""
    def refuse(constant):
        raise ValueError(f'not JSON: {constant}')
    return json.loads(text, parse_constant=refuse)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_export_replaces_only_an_earlier_export(run_dir, tmp_path, capsys):
    from timm_ic.cli import main
    # a project folder that happens to hold a config.json: never deleted
    project = tmp_path / 'project'
    (project / 'src').mkdir(parents=True)
    (project / 'config.json').write_text('{}')
    (project / 'src' / 'main.py').write_text('x = 1\n')
    # a folder holding only a config.json that is not ours, or only a README.md
    foreign_config, readme_only = tmp_path / 'foreign_config', tmp_path / 'readme_only'
    foreign_config.mkdir()
    (foreign_config / 'config.json').write_text('{"architecture": "resnet18"}')
    readme_only.mkdir()
    (readme_only / 'README.md').write_text('my notes')
    for folder, named in ((project, 'src'), (foreign_config, 'config.json'), (readme_only, 'config.json')):
        before = _tree(folder)
        assert main(['export', str(run_dir), str(folder)]) == 2
        err = capsys.readouterr().err
        assert str(folder) in err and named in err and 'Nothing was changed' in err and 'Traceback' not in err
        assert _tree(folder) == before and (folder / 'src').is_dir() == (folder is project)
    # an earlier export is replaced, an empty folder filled; an export with a file added is kept
    out = tmp_path / 'export'
    out.mkdir()
    assert main(['export', str(run_dir), str(out)]) == 0
    assert main(['export', str(run_dir), str(out), '--repo-id', 'testorg/again']) == 0
    assert 'testorg/again' in (out / 'README.md').read_text()
    (out / 'notes.txt').write_text('mine')
    assert main(['export', str(run_dir), str(out)]) == 2
    assert 'notes.txt' in capsys.readouterr().err and (out / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['export', 'foreign_config', 'project', 'readme_only']


def test_no_overwrite_message_names_real_flags(run_dir, tmp_path, capsys):
    import re
    from timm_ic.cli import build_parser, main
    out = tmp_path / 'export'
    assert main(['export', str(run_dir), str(out)]) == 0
    capsys.readouterr()
    assert main(['export', str(run_dir), str(out), '--no-overwrite']) == 2
    err = capsys.readouterr().err
    assert 'exists' in err and '--no-overwrite' in err
    export_parser = build_parser()._subparsers._group_actions[0].choices['export']
    flags = {f for action in export_parser._actions for f in action.option_strings}
    mentioned = set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', err))
    assert mentioned and mentioned <= flags, mentioned - flags


def test_export_of_a_diverged_run_writes_strict_json_and_refuses_non_finite_weights(run_dir, tmp_path, capsys):
    from timm_ic.cli import main
    record = json.loads((run_dir / 'run.json').read_text())
    # the best epoch's loss is NaN (json.dumps writes it as a bare NaN, as train.py's writer did)
    nan_loss = _hand_made_run(run_dir, tmp_path / 'nan_loss', metrics={**record['metrics'], 'loss': float('nan')})
    out = hub.export(nan_loss, tmp_path / 'out')
    config = _strict_json((out / 'config.json').read_text())
    assert config['timm_ic']['metrics']['loss'] is None
    assert config['timm_ic']['metrics']['top1'] == record['metrics']['top1']
    assert config['timm_ic']['non_finite']['fields'] == ['timm_ic.metrics.loss']
    assert 'NaN' in config['timm_ic']['non_finite']['reason']
    assert 'nan' not in (out / 'README.md').read_text().lower().replace('nanoseconds', '')
    # weights that diverged: refused before anything is written, naming the tensors
    diverged = _hand_made_run(run_dir, tmp_path / 'diverged')
    weights = safetensors.torch.load_file(str(diverged / 'best.safetensors'))
    bad = sorted(k for k in weights if k.endswith('.weight'))[:2]
    for k in bad:
        weights[k][..., 0] = float('nan')
    safetensors.torch.save_file(weights, str(diverged / 'best.safetensors'))
    assert main(['export', str(diverged), str(tmp_path / 'out_diverged')]) == 2
    err = capsys.readouterr().err
    assert 'NaN or inf' in err and all(k in err for k in bad) and 'best.safetensors' in err
    assert not (tmp_path / 'out_diverged').exists()


def _copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_push_verifies_the_export_before_sending(exported, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    from timm_ic.cli import main
    # nothing listens there: a push that reaches the network fails with exit code 4, never touching the Hub
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        dead = f'http://127.0.0.1:{s.getsockname()[1]}'
    monkeypatch.setattr(constants, 'ENDPOINT', dead)
    truncated = _copy_folder(exported, tmp_path / 'truncated')
    (truncated / 'model.safetensors').write_bytes((exported / 'model.safetensors').read_bytes()[:-64])
    other_arch = _copy_folder(exported, tmp_path / 'other_arch')
    config = json.loads((exported / 'config.json').read_text())
    (other_arch / 'config.json').write_text(json.dumps({**config, 'architecture': 'ic_resnet56'}))
    non_finite = _copy_folder(exported, tmp_path / 'non_finite')
    weights = safetensors.torch.load_file(str(exported / 'model.safetensors'))
    weights['fc.weight'] = torch.full_like(weights['fc.weight'], float('inf'))
    safetensors.torch.save_file(weights, str(non_finite / 'model.safetensors'))
    bare_nan = _copy_folder(exported, tmp_path / 'bare_nan')
    (bare_nan / 'config.json').write_text(json.dumps({**config, 'timm_ic': {'metrics': {'loss': float('nan')}}}))
    for folder, words in ((truncated, ('model.safetensors', 'truncated')),
                          (other_arch, ('does not fit the ic_resnet56', 'missing')),
                          (non_finite, ('fc.weight', 'NaN or inf')),
                          (bare_nan, ('config.json', 'not valid JSON'))):
        before = _tree(folder)
        assert main(['push', str(folder), 'testorg/broken']) == 2, folder
        err = capsys.readouterr().err
        assert all(w in err for w in words) and dead not in err and 'Traceback' not in err, err
        assert _tree(folder) == before
        with pytest.raises((hub.ExportError, FileNotFoundError)):
            hub.push(folder, 'testorg/broken')
    # a sound export reaches the (dead) Hub: exit code 4, as train.py --push-to-hub; a folder that is
    # neither an export nor a run: 2
    assert main(['push', str(exported), 'testorg/ok']) == 4
    assert 'could not reach the Hub' in capsys.readouterr().err
    assert main(['push', str(tmp_path), 'testorg/ok']) == 2
    assert 'not an export folder' in capsys.readouterr().err


def test_which_weight_files_are_read_is_as_the_readme_says(tmp_path):
    # README, "Which weight files are read": timm's own architectures under plain timm.create_model fall back
    # to pytorch_model.bin, read with torch.load(weights_only=True); timm_ic.hub.create_model refuses it
    model = timm.create_model('resnet18', num_classes=3)
    folder = tmp_path / 'r18'
    folder.mkdir()
    torch.save(model.state_dict(), folder / 'pytorch_model.bin')
    (folder / 'config.json').write_text(json.dumps({'architecture': 'resnet18', 'num_classes': 3}))
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    with pytest.raises(hub.PretrainedWeightsError, match='safetensors only'):
        hub.create_model(f'local-dir:{folder}', pretrained=True)
    # a pickle that is more than tensors is refused by weights_only=True, never executed
    torch.save({**model.state_dict(), 'fc.extra': Path('x')}, folder / 'pytorch_model.bin')
    with pytest.raises(Exception, match='weights_only|[Ww]eights only load failed'):
        timm.create_model(f'local-dir:{folder}', pretrained=True)
    readme = (REPO_ROOT / 'README.md').read_text()
    assert 'torch.load(weights_only=True)' in readme and 'pytorch_model.bin' in readme
