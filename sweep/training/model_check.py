"""The edge check of a model named by import path, and what every trial records of its model.

``check_model`` runs before any store is written (``commands.launch.open_study_stores``): it
builds the network once, as a trial would, and trains it one step on a dummy batch, so that a
factory that cannot work fails there with one line instead of failing every trial.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
from pathlib import Path

import torch

from sweep.base.text import first_line
from sweep.errors import ModelError
from sweep.study.model_ref import is_import_path
from sweep.study.specs import TrainSpec
from sweep.training import models
from sweep.training.factory import load_factory
from sweep.training.models import memory_format, trial_model

DUMMY_BATCH = 2  # images in the check's batch: the least BatchNorm accepts in training mode


def check_model(train: TrainSpec, num_classes: int) -> None:
    """Raise ``ModelError`` (one line) unless ``train.model``'s network, built with
    ``num_classes``, has floating-point parameters only and maps a ``2 x 3 x 32 x 32`` batch
    (in the layout it will train in) to ``2 x num_classes`` floating-point logits, forward
    and backward. Built-in names pass without building. The caller's random state is kept."""
    if not is_import_path(train.model):
        return
    name = train.model
    with torch.random.fork_rng(devices=[]):
        model = trial_model(train, num_classes)
        params = list(model.named_parameters())
        if not params:
            raise ModelError(f"train.model {name}: the network has no parameters; there is "
                             f"nothing to train")
        for pname, p in params:
            if not p.is_floating_point():
                raise ModelError(f"train.model {name}: parameter {pname!r} is {p.dtype}; every "
                                 f"parameter must be floating point (register integer state "
                                 f"as a buffer)")
        layout = memory_format(train.channels_last)
        x = torch.randn(DUMMY_BATCH, 3, 32, 32).contiguous(memory_format=layout)
        try:
            out = model.to(memory_format=layout)(x)
        except Exception as err:
            if layout == torch.channels_last and _works_in_nchw(model, x):
                raise ModelError(f"train.model {name}: the forward fails on channels_last input "
                                 f"({first_line(err, typed=True)}); set train.channels_last: "
                                 f"false") from None
            raise ModelError(f"train.model {name}: the forward on a {DUMMY_BATCH} x 3 x 32 x 32 "
                             f"batch failed: {first_line(err, typed=True)}; fix the module") from None
        want = (DUMMY_BATCH, num_classes)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want \
                or not out.is_floating_point():
            got = (f"{type(out).__name__}" if not isinstance(out, torch.Tensor)
                   else f"{tuple(out.shape)} {out.dtype}")
            raise ModelError(f"train.model {name}: a {DUMMY_BATCH} x 3 x 32 x 32 batch gave {got}; "
                             f"the network must return floating-point logits of shape "
                             f"{DUMMY_BATCH} x {num_classes} (num_classes, from data.dataset)")
        try:
            out.float().sum().backward()
        except Exception as err:
            raise ModelError(f"train.model {name}: backward through the logits failed: "
                             f"{first_line(err, typed=True)}; every output must depend on the "
                             f"parameters through differentiable operations") from None


def _works_in_nchw(model: torch.nn.Module, x: torch.Tensor) -> bool:
    try:
        model.to(memory_format=torch.contiguous_format)(x.contiguous())
    except Exception:
        return False
    return True


def model_record(train: TrainSpec, num_classes: int) -> dict:
    """What a trial records of its model: ``model`` (the name or import path), ``model_args``
    (JSON), ``model_parameters`` (the count of trainable numbers) and ``model_source_sha256``
    (of the factory's source file; for a built-in, of ``sweep/training/models.py``)."""
    return dict(_record(train.model, json.dumps(dict(train.model_args), sort_keys=True),
                        train.width, num_classes))


@functools.lru_cache(maxsize=16)  # once per worker and model: trials of a study share it
def _record(model: str, args_json: str, width: int, num_classes: int) -> tuple:
    with torch.random.fork_rng(devices=[]):
        net = models.build_model(model, width, num_classes, json.loads(args_json))
    count = sum(p.numel() for p in net.parameters())
    source = _source_file(load_factory(model)) if is_import_path(model) else Path(models.__file__)
    digest = hashlib.sha256(source.read_bytes()).hexdigest() if source else "unknown"
    return (("model", model), ("model_args", args_json), ("model_parameters", count),
            ("model_source_sha256", digest))


def _source_file(factory) -> Path | None:
    try:
        return Path(inspect.getsourcefile(factory))
    except (TypeError, OSError):
        module = sys.modules.get(getattr(factory, "__module__", ""), None)
        file = getattr(module, "__file__", None)
        return Path(file) if file else None
