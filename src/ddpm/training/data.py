"""The data a run trains on, as ``ddpm train`` opens it: ``config.data``'s source checked against
the model (item shape; labels and their number for a class-conditional model), its class names
recorded in the run's config, and batches fetched by index.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig, item_shape
from ..data.sources import open_data, require_labels
from ..errors import UserError


def open_training_data(config: TrainConfig):
    """``config.data`` opened (``ddpm.data.sources.open_data``) and checked against ``config.model``."""
    dataset = open_data(config.data)  # every DataConfig field (incl. hf: image/label columns)
    want = item_shape(config)
    if tuple(dataset.shape) != want:
        raise UserError(f"data {config.data.source!r} has items of shape {tuple(dataset.shape)} but the model "
                        f"expects {want}; set data.image_size/data.channels or the model's size")
    num_classes = config.model.num_classes
    if num_classes is not None:

        found = require_labels(dataset, "a class-conditional run (model.num_classes)")
        if found != num_classes:
            raise UserError(f"data {config.data.source!r} has {found} classes but model.num_classes is {num_classes}; "
                            f"set model.num_classes={found} or train with --classes auto")
    return dataset


def with_class_names(config: TrainConfig, dataset) -> TrainConfig:
    """A conditional run records its data's class names (data.class_names) in its config, so that
    sampling by name works from the run alone; resuming on data with other names is refused."""
    names = getattr(dataset, "class_names", None)
    if config.model.num_classes is None or not names:
        return config
    saved = config.data.class_names
    if saved is not None and tuple(saved) != tuple(names):
        raise UserError(f"data {config.data.source!r} names its classes {', '.join(names)} but the run's "
                        f"data.class_names are {', '.join(saved)}: the labels would mean other classes")
    return config.override(**{"data.class_names": list(names)})


def get_batch(dataset, indices: torch.Tensor) -> torch.Tensor:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return torch.stack([dataset[int(i)] for i in indices])
