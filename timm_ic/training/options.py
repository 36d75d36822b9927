"""train.py's options: the parser, recipes merged under explicit flags, and the checks that fail fast on values
that cannot work (before anything is created)."""
import argparse
from typing import Any, Dict, Optional, Sequence

import timm
import torch

from .. import models
from ..placement import Placement
from .errors import UsageError
from .model import check_model_name, check_safetensors_file
from .recipes import list_recipes, load_recipe

DESCRIPTION = ("Train a timm model (ours or timm's) with Hugging Face Accelerate: one CPU, one GPU, many GPUs, "
               "many nodes.")

DEFAULT_RECIPE = 'digits_demo'



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--recipe', default=None,
                        help=f'named recipe ({", ".join(list_recipes())}) or a YAML file; flags override it')

    group = parser.add_argument_group('data')
    group.add_argument('--data-dir', default=None, help='ImageNet-layout folder (train/ and val/ class folders), '
                       'or the root of hfds/ caches and wds/ shards; none: the embedded digits')
    group.add_argument('--dataset', default='', help='digits | folder | hfds/NAME | wds/NAME | torch/NAME '
                       '(torchvision: fashion_mnist, mnist, kmnist, cifar10, cifar100)')
    group.add_argument('--dataset-download', action='store_true',
                       help='torch/NAME: let torchvision download the data into --data-dir (default '
                       '~/.cache/timm_ic/data; needs a network)')
    group.add_argument('--train-split', default='train')
    group.add_argument('--val-split', default='validation')
    group.add_argument('--input-key', default=None, help="hfds/wds image field (e.g. 'img' for CIFAR on the Hub)")
    group.add_argument('--target-key', default=None, help='hfds/wds label field')
    group.add_argument('--bad-images', choices=('fail', 'skip'), default='fail',
                       help='on an unreadable image: stop with its name, or skip it and count it')
    group.add_argument('--workers', type=int, default=4, help='data-loading worker processes per process')
    group.add_argument('--input-size', type=int, nargs=3, default=None, metavar=('C', 'H', 'W'))
    group.add_argument('--img-size', type=int, default=None)
    group.add_argument('--crop-pct', type=float, default=None)
    group.add_argument('--mean', type=float, nargs='+', default=None)
    group.add_argument('--std', type=float, nargs='+', default=None)
    group.add_argument('--interpolation', default=None)

    group = parser.add_argument_group('augmentation and regularisation')
    group.add_argument('--no-aug', action='store_true')
    group.add_argument('--scale', type=float, nargs=2, default=None, help='random-resized-crop area range')
    group.add_argument('--ratio', type=float, nargs=2, default=None, help='random-resized-crop aspect range')
    group.add_argument('--hflip', type=float, default=0.5)
    group.add_argument('--vflip', type=float, default=0.0)
    group.add_argument('--color-jitter', type=float, default=0.4)
    group.add_argument('--aa', default=None, help='timm auto-augment policy, e.g. rand-m9-mstd0.5')
    group.add_argument('--reprob', type=float, default=0.0, help='random-erasing probability')
    group.add_argument('--smoothing', type=float, default=0.0, help='label smoothing')
    group.add_argument('--mixup', type=float, default=0.0, help='Mixup alpha (0: off)')
    group.add_argument('--cutmix', type=float, default=0.0, help='CutMix alpha (0: off)')
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', default='batch', choices=('batch', 'pair', 'elem'))
    group.add_argument('--drop-rate', type=float, default=None, help="the model's drop_rate kwarg")
    group.add_argument('--ema-decay', type=float, default=0.0, help='ModelEmaV3 decay (0: no EMA)')

    group = parser.add_argument_group('model')
    group.add_argument('--model', default='ic_resnet20', help='any timm model name, timm-ic ones included')
    group.add_argument('--placement', default=None,
                       help="timm-ic placement, e.g. 'ic:drop=uout,beta=0.1'; '' keeps the model's own. A "
                            "recipe's placement applies to the recipe's model and to skeleton-only ones (cifar_*)")
    group.add_argument('--pretrained', action='store_true', help='start from the Hub weights of --model')
    group.add_argument('--initial-weights', default=None, help='start from this .safetensors file')
    group.add_argument('--num-classes', type=int, default=None,
                       help='must match the data; with --pretrained the classifier is re-initialised')
    group.add_argument('--in-chans', type=int, default=None, help='default: 1 for the digits, else 3')

    group = parser.add_argument_group('optimisation')
    group.add_argument('--epochs', type=int, default=10)
    group.add_argument('--batch-size', type=int, default=128, help='per process')
    group.add_argument('--grad-accum-steps', type=int, default=1)
    group.add_argument('--opt', default='sgd', help="timm optimizer: sgd (Nesterov), momentum, adamw, ...")
    group.add_argument('--lr', type=float, default=0.1)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=1e-4)
    group.add_argument('--clip-grad', type=float, default=None, help='gradient-norm clipping (off by default)')
    group.add_argument('--sched', default='cosine', help='timm scheduler: cosine, step, multistep, ...')
    group.add_argument('--warmup-epochs', type=float, default=0)
    group.add_argument('--warmup-lr', type=float, default=1e-5)
    group.add_argument('--min-lr', type=float, default=0.0)
    group.add_argument('--decay-epochs', type=float, default=None, help="'step': decay every this many epochs")
    group.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], help="'multistep'")
    group.add_argument('--decay-rate', type=float, default=0.1)

    group = parser.add_argument_group('hardware')
    group.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16', 'fp8'), default=None,
                       help="default: accelerate config's")
    group.add_argument('--channels-last', action='store_true')
    group.add_argument('--redraw-dropout', action='store_true',
                       help='CUDA: dropouts and Uout keep a seed, not their masks or noise, for backward, and draw '
                            'them again there (one Triton pass each way): less peak memory (README, "Layers")')
    group.add_argument('--compile', action='store_true', help='torch.compile (inductor) via Accelerate')
    group.add_argument('--sync-bn', action='store_true', help='synchronise BatchNorm statistics across processes')
    group.add_argument('--cpu', action='store_true', help='run on CPU even if a GPU is there (torchrun + gloo)')
    group.add_argument('--seed', type=int, default=42)

    group = parser.add_argument_group('output, checkpoints and logging')
    group.add_argument('--output', default=None, help='output folder')
    group.add_argument('--overwrite', action='store_true',
                       help="start a new run in an --output that holds a previous run's weights and run.json")
    group.add_argument('--resume', default=None, nargs='?', const='auto',
                       help="'auto' (the default when given alone: latest checkpoint in --output, if any) or a "
                            "checkpoint / output folder")
    group.add_argument('--checkpoint-every', type=int, default=0,
                       help='also checkpoint every N optimizer updates (0: at epoch ends only)')
    group.add_argument('--checkpoint-limit', type=int, default=3, help='checkpoints kept')
    group.add_argument('--log-with', default=None, help='Accelerate trackers: tensorboard, wandb, all, ...')
    group.add_argument('--log-interval', type=int, default=20, help='progress-bar updates every N batches')
    group.add_argument('--limit-train-batches', type=int, default=None,
                       help='at most N batches per epoch (rounded down to whole --grad-accum-steps windows)')
    group.add_argument('--push-to-hub', default=None, metavar='REPO',
                       help='at the end, upload best weights and a model card (timm_ic.hub.push_run)')
    return parser



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Defaults, then the recipe, then explicit flags. Adds `recipe_values` (the recipe as read) to the result."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)  # to find the recipe and whether any data was given
    recipe = first.recipe
    if recipe is None and not first.data_dir and first.dataset in ('', 'digits'):
        recipe = DEFAULT_RECIPE
    recipe_values = None
    if recipe is not None:
        dests = {a.dest for a in parser._actions if a.dest not in ('help', 'recipe')}
        recipe_values = load_recipe(recipe, valid_keys=dests)
        # the recipe's placement is decided below, once the model is known
        parser.set_defaults(**{k: v for k, v in recipe_values.items() if not k.startswith('_') and k != 'placement'})
    args = parser.parse_args(argv)
    args.recipe = recipe
    args.recipe_values = recipe_values
    if args.placement is None and recipe_values and recipe_values.get('placement'):
        if recipe_placement_applies(args.model, recipe_values.get('model')):
            args.placement = recipe_values['placement']
    return args



def recipe_placement_applies(model: str, recipe_model: Optional[str]) -> bool:
    """A recipe's placement is for its own model, or for a skeleton-only one (whose own placement has no
    dropout, e.g. cifar_wrn28_10): a model that brings its own placement (ic_wrn28_10, uout_wrn28_10) keeps it,
    or the weights published under its name would be another network's."""
    if model == recipe_model:
        return True
    if not timm.is_model(model):
        return False
    try:
        with torch.device('meta'):  # no memory, no init cost: only the default placement is wanted
            placement = getattr(models.create_model(model), 'placement', None)
    except Exception:  # a model that cannot be built this way is not a timm-ic skeleton
        return False
    return placement is not None and not placement.has_drop



def check_options(args: argparse.Namespace) -> None:
    """Fail fast, before anything is created, on option values that cannot work."""
    check_model_name(args.model)
    if args.grad_accum_steps < 1 or args.batch_size < 1 or args.epochs < 1:
        raise UsageError('--batch-size, --epochs and --grad-accum-steps must be at least 1.')
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f'Mixup/CutMix pair samples within a batch: --batch-size must be even, not {args.batch_size}.')
    if not args.lr > 0:  # 0 would train nothing, silently
        raise UsageError(f'--lr must be greater than 0, not {args.lr:g}.')
    for name, low, high in (('warmup_lr', 0, None), ('min_lr', 0, None), ('weight_decay', 0, None),
                            ('momentum', 0, 1), ('workers', 0, None), ('checkpoint_every', 0, None),
                            ('mixup', 0, None), ('cutmix', 0, None), ('smoothing', 0, 1), ('ema_decay', 0, 1),
                            ('reprob', 0, 1), ('hflip', 0, 1), ('vflip', 0, 1)):
        value = getattr(args, name)
        if value < low or (high is not None and value > high):
            bounds = f'between {low} and {high}' if high is not None else f'at least {low}'
            raise UsageError(f'--{name.replace("_", "-")} must be {bounds}, not {value:g}.')
    for name in ('checkpoint_limit', 'log_interval'):
        if getattr(args, name) < 1:
            raise UsageError(f'--{name.replace("_", "-")} must be at least 1, not {getattr(args, name)}.')
    if args.clip_grad is not None and not args.clip_grad > 0:
        raise UsageError(f'--clip-grad must be greater than 0 (leave it out for no clipping), not {args.clip_grad:g}.')
    if args.drop_rate is not None and not 0 <= args.drop_rate < 1:
        raise UsageError(f'--drop-rate must be at least 0 and below 1, not {args.drop_rate:g}.')
    if args.placement:
        try:
            Placement.parse(args.placement)
        except (ValueError, TypeError) as e:
            raise UsageError(f'--placement {args.placement!r}: {e}') from None
    if args.initial_weights:
        check_safetensors_file(args.initial_weights, '--initial-weights')
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)



def check_repo_id(repo_id: str) -> None:
    """A Hub repository id `--push-to-hub` can push to, checked before training rather than after it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        if repo_id.count('/') != 1:
            raise HFValidationError('it needs a namespace: <user or org>/<name>')
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f'--push-to-hub {repo_id!r} is not a Hub repository id ({e}); give <user or org>/<name>, '
                         f'e.g. my-org/ic_resnet20-digits.') from None



def tracker_config(args: argparse.Namespace) -> Dict[str, Any]:
    """Options as scalars, which is what every tracker accepts as hyper-parameters."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()
            if k != 'recipe_values'}

