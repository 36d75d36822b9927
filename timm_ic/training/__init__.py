"""Building blocks of the repository's `train.py`: data sets with input checks, atomic checkpoints, run records.

`train.py` reads top to bottom like Accelerate's examples; what it needs beyond timm and Accelerate lives here.
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
from .run_record import RUN_RECORD_SCHEMA, library_versions, write_json_atomic

__all__ = [
    'CHECKPOINT_PREFIX', 'CheckpointError', 'find_latest_checkpoint', 'find_resumable_checkpoint',
    'list_checkpoints', 'load_checkpoint', 'load_train_state', 'prune_checkpoints', 'save_checkpoint',
    'save_weights', 'verify_checkpoint', 'BadImageError', 'CheckedImageDataset', 'DataError', 'SeededAugmentation',
    'build_datasets',
    'check_num_classes', 'RecipeError', 'list_recipes', 'load_recipe', 'RUN_RECORD_SCHEMA', 'library_versions',
    'write_json_atomic',
]
