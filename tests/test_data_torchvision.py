"""torchvision data sets (`--dataset torch/NAME`) in train.py and `timm-ic diagnose`, and Fashion-MNIST from the
Debian package's files. Tiny IDX files in torchvision's layout stand in for the real data: no test needs the
package or the network."""
import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from timm_ic.training.data import (
    FASHION_MNIST_DEBIAN_ENV, DATA_CACHE_ENV, MNIST_RAW_FILES, DataError, build_datasets, dataset_key,
    default_in_chans, fashion_mnist_root,
)

FASHION_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                   'Ankle boot']


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    """No Debian package and an empty private cache, whatever this machine has installed."""
    monkeypatch.setenv(FASHION_MNIST_DEBIAN_ENV, str(tmp_path / 'no-package'))
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / 'cache'))


@pytest.fixture
def debian(tmp_path, monkeypatch, write_idx_set):
    """A fake Debian package: the gzipped IDX files, in a folder the env var points at."""
    folder = write_idx_set(tmp_path / 'debian', gz=True)
    monkeypatch.setenv(FASHION_MNIST_DEBIAN_ENV, str(folder))
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / 'cache'))
    return folder


def test_torch_fashion_mnist_from_data_dir_reads_train_and_test(tmp_path, no_debian, write_idx_set):
    write_idx_set(tmp_path / 'root' / 'FashionMNIST' / 'raw', n_train=40, n_test=20)
    train_ds, val_ds, names = build_datasets('torch/fashion_mnist', str(tmp_path / 'root'), input_img_mode='L')
    assert (len(train_ds), len(val_ds)) == (40, 20)  # 'validation' is the test split, as in timm
    assert names == FASHION_CLASSES
    img, target = train_ds[3]
    assert img.mode == 'L' and img.size == (28, 28) and target == 3
    # a colour model gets the grey image as RGB, and timm's transform is applied after the conversion
    train_rgb, _, _ = build_datasets('torch/fashion_mnist', str(tmp_path / 'root'), input_img_mode='RGB')
    train_rgb.transform = lambda im: torch.as_tensor(np.array(im)).permute(2, 0, 1)
    assert train_rgb[3][0].shape == (3, 28, 28)


def test_debian_files_are_decompressed_once_into_the_cache(tmp_path, debian):
    root = fashion_mnist_root(None)
    raw = Path(root) / 'FashionMNIST' / 'raw'
    assert Path(root) == tmp_path / 'cache'
    for name in MNIST_RAW_FILES:
        assert (raw / name).read_bytes() == gzip.decompress((debian / f'{name}.gz').read_bytes())
    assert sorted(os.listdir(raw)) == sorted(MNIST_RAW_FILES)  # no temporary files left behind
    stamps = {name: (raw / name).stat().st_mtime_ns for name in MNIST_RAW_FILES}
    (debian / f'{MNIST_RAW_FILES[0]}.gz').unlink()  # the cache is used from now on: the package may even go
    assert fashion_mnist_root(None) == root
    assert {name: (raw / name).stat().st_mtime_ns for name in MNIST_RAW_FILES} == stamps
    train_ds, val_ds, _ = build_datasets('torch/fashion_mnist', None, input_img_mode='L')
    assert (len(train_ds), len(val_ds)) == (40, 20)


def test_a_data_dir_with_the_files_wins_over_the_package(tmp_path, debian, write_idx_set):
    write_idx_set(tmp_path / 'mine' / 'FashionMNIST' / 'raw', n_train=30, n_test=10)
    assert fashion_mnist_root(str(tmp_path / 'mine')) == str(tmp_path / 'mine')
    # a data dir without the files falls back to the package, writing nothing into the user's folder
    (tmp_path / 'empty').mkdir()
    assert fashion_mnist_root(str(tmp_path / 'empty')) == str(tmp_path / 'cache')
    assert not any((tmp_path / 'empty').iterdir())


def test_damaged_package_file_is_a_data_error(tmp_path, debian):
    (debian / f'{MNIST_RAW_FILES[1]}.gz').write_bytes(b'\x1f\x8b\x08\x00broken')
    with pytest.raises(DataError, match='reinstall'):
        fashion_mnist_root(None)
    assert not (tmp_path / 'cache' / 'FashionMNIST' / 'raw' / MNIST_RAW_FILES[1]).exists()


def test_missing_fashion_mnist_names_both_ways_to_get_it(no_debian):
    with pytest.raises(DataError) as info:
        build_datasets('torch/fashion_mnist', None)
    message = str(info.value)
    assert 'apt-get install dataset-fashion-mnist' in message and '--dataset-download' in message


def test_other_torch_sets_need_data_dir_or_download_and_bad_names_and_splits_fail(tmp_path, no_debian, write_idx_set):
    with pytest.raises(DataError, match='--dataset-download'):
        build_datasets('torch/mnist', None)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataError, match='--dataset-download'):  # torchvision's "not found", made a DataError
        build_datasets('torch/kmnist', str(tmp_path / 'empty'))
    with pytest.raises(DataError, match='torch/fashion_mnist'):
        build_datasets('torch/fashion', None)
    write_idx_set(tmp_path / 'root' / 'MNIST' / 'raw')
    train_ds, val_ds, names = build_datasets('torch/mnist', str(tmp_path / 'root'), val_split='test')
    assert (len(train_ds), len(val_ds)) == (40, 20) and len(names) == 10
    with pytest.raises(DataError, match='train and a test split'):
        build_datasets('torch/mnist', str(tmp_path / 'root'), train_split='test')


def test_channels_and_card_keys():
    from timm_ic.models.tags import load_hub_cards
    assert [default_in_chans(d) for d in ('', 'torch/fashion_mnist', 'torch/mnist', 'torch/cifar10', 'hfds/x')] == \
        [1, 1, 1, 3, 3]
    datasets = load_hub_cards()['datasets']
    for name in ('', 'torch/fashion_mnist', 'torch/cifar10', 'torch/cifar100'):
        assert dataset_key(name) in datasets
    assert dataset_key('torch/kmnist') is None and dataset_key('', '/data') is None
    assert datasets['fmnist']['hub_id'] == 'zalando-datasets/fashion_mnist'
    assert datasets['fmnist']['cfg']['mean'] == [0.2860] and datasets['fmnist']['cfg']['input_size'][0] == 1


@pytest.fixture
def train(one_thread):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    from timm_ic.training import train as train_module
    yield train_module
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


FAST = ['--epochs', '1', '--batch-size', '8', '--limit-train-batches', '2', '--workers', '0', '--log-interval', '1']


def test_train_recipe_on_debian_files_records_the_card_dataset(tmp_path, debian, train):
    out = tmp_path / 'run'
    code = train.main(['--recipe', 'fashion_mnist_resnet20', '--output', str(out), *FAST])
    assert code == 0
    record = json.loads((out / 'run.json').read_text())
    assert record['status'] == 'finished' and record['in_chans'] == 1
    assert record['dataset']['key'] == 'fmnist' and record['dataset']['name'] == 'torch/fashion_mnist'
    assert (record['dataset']['train_samples'], record['dataset']['val_samples']) == (40, 20)
    assert record['label_names'] == FASHION_CLASSES
    assert record['data_config']['mean'] == [0.286] and record['data_config']['input_size'] == [1, 28, 28]
    assert record['epochs'][0]['eval_samples'] == 20  # every test image evaluated
    from timm_ic.hub.export import _dataset_info
    assert _dataset_info(record['dataset'])['hub_id'] == 'zalando-datasets/fashion_mnist'


def test_train_without_the_data_exits_2_naming_both_ways(tmp_path, no_debian, train, capsys):
    code = train.main(['--recipe', 'fashion_mnist_resnet20', '--output', str(tmp_path / 'run'), *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert 'apt-get install dataset-fashion-mnist' in err and '--dataset-download' in err
    assert 'Traceback' not in err


def test_diagnose_reads_torch_fashion_mnist(tmp_path, debian, one_thread, capsys):
    from timm_ic.cli import main
    out = tmp_path / 'diag'
    assert main(['diagnose', '--model', 'cifar_resnet20', '--dataset', 'torch/fashion_mnist', '--batches', '1',
                 '--batch-size', '8', '--out', str(out)]) == 0
    report = json.loads((out / 'report.json').read_text())
    assert report['settings']['data'] == 'torch/fashion_mnist (train)'
    capsys.readouterr()
    assert main(['diagnose', '--model', 'cifar_resnet20', '--dataset', 'torch/mnist', '--out', str(out)]) == 2
    assert '--dataset-download' in capsys.readouterr().err


def test_grey_default_without_recipe_and_resume_may_add_dataset_download(tmp_path, no_debian, train, write_idx_set):
    """No recipe, no --input-size: a grey data set on a model whose cfg says 3x32x32 trains at 1x32x32. And
    --dataset-download only says where files may come from: resuming with it is the same run."""
    write_idx_set(tmp_path / 'root' / 'FashionMNIST' / 'raw')
    argv = ['--dataset', 'torch/fashion_mnist', '--data-dir', str(tmp_path / 'root'), '--output', str(tmp_path / 'run'),
            *FAST]
    assert train.main(argv) == 0
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    # the files are there, so torchvision checks them and downloads nothing
    assert train.main(argv + ['--resume', 'auto', '--dataset-download']) == 0
    record = json.loads((tmp_path / 'run' / 'run.json').read_text())
    assert record['status'] == 'finished' and record['in_chans'] == 1  # grey by default for the MNIST family
    assert record['data_config']['input_size'] == [1, 32, 32]
