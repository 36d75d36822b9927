"""The repository's `train.py`, importable: `train` is the script (read it top to bottom, like Accelerate's
`complete_cv_example.py`), the other modules are its pieces:

    train        training_function (options, output folder, data, model, optimizer, resume, epochs) and main
    options      the parser, recipes under explicit flags, checks that fail fast on bad values
    model        timm.create_model with the options (--placement, --initial-weights, --pretrained)
    data         data sets with input checks, seeded augmentation, transforms, loaders
    loop         TrainState, train_one_epoch, evaluate, the lagged readout and the non-finite checks
    checkpoint   atomic checkpoints; the resume and output-folder policy
    recipes      named YAML recipes
    errors       the errors train.py answers with an exit code

The run record it writes, run.json, is `timm_ic.run_record.RunRecord` (re-exported here).
"""
from .checkpoint import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_train_state,
    prune_checkpoints,
    save_checkpoint,
    save_weights,
    verify_checkpoint,
)
from .data import BadImageError, CheckedImageDataset, DataError, SeededAugmentation, build_datasets, check_num_classes
from .recipes import RecipeError, list_recipes, load_recipe
from ..run_record import RUN_RECORD_SCHEMA, RunRecord, RunRecordError

__all__ = [
    'CHECKPOINT_PREFIX', 'CheckpointError', 'find_latest_checkpoint', 'find_resumable_checkpoint',
    'list_checkpoints', 'load_checkpoint', 'load_train_state', 'prune_checkpoints', 'save_checkpoint',
    'save_weights', 'verify_checkpoint', 'BadImageError', 'CheckedImageDataset', 'DataError', 'SeededAugmentation',
    'build_datasets',
    'check_num_classes', 'RecipeError', 'list_recipes', 'load_recipe', 'RUN_RECORD_SCHEMA', 'RunRecord',
    'RunRecordError',
]
