"""The typed specs a study file is validated into (frozen dataclasses), and the names
of what they may hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sweep.study.model_ref import NUM_CLASSES
from sweep.study.pruner_rules import PRUNER_PARAMS

OPTIMIZERS = ("sgd", "adamw")
SAMPLERS = ("tpe", "random")
PRUNERS = tuple(PRUNER_PARAMS)  # none, median, percentile, successive_halving, ...
METRICS = ("val_acc", "val_loss")  # what the trainer produces each epoch
DIRECTIONS = ("maximize", "minimize")
SPACE_KEYS = ("warmup_steps", "base_lr", "scheduler")  # every space has these
#: ``train:`` fields that may be searched in ``space:`` instead (per trial; per slot in a pack)
SEARCHABLE_TRAIN = ("weight_decay", "momentum", "nesterov", "warmup_shape", "warmup_start_factor",
                    "label_smoothing", "beta1", "beta2")
#: the optimizer each optimizer-specific field belongs to (elsewhere it would be silently unused)
OPTIMIZER_OF = {"momentum": "sgd", "nesterov": "sgd", "beta1": "adamw", "beta2": "adamw"}


# --- typed specs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class CategoricalParam:
    choices: tuple


@dataclass(frozen=True)
class Fixed:
    value: Any


Param = IntParam | FloatParam | CategoricalParam | Fixed


@dataclass(frozen=True)
class SearchSpace:
    """``scheduler`` maps each scheduler type to its conditional parameters."""

    warmup_steps: Param
    base_lr: Param
    scheduler: Mapping[str, Mapping[str, Param]]
    #: the ``train:`` fields given in ``space:`` (``SEARCHABLE_TRAIN``), by name
    train: Mapping[str, Param] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    train_size: int = 45_000
    val_size: int = 5_000
    test_size: int | None = None  # None: the whole test batch
    split_seed: int = 0
    dataset: str = "cifar10"  # or cifar100 (fine labels)

    @property
    def num_classes(self) -> int:
        """The classes of ``dataset``: the model's output width."""
        return NUM_CLASSES[self.dataset]


@dataclass(frozen=True)
class TrainSpec:
    model: str = "resnet20"  # a built-in name or an import path MODULE:FACTORY (model_ref.py)
    width: int = 1
    #: keyword arguments of a factory named by import path (with ``num_classes``)
    model_args: Mapping[str, Any] = field(default_factory=dict)
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = True  # sgd only
    beta1: float = 0.9  # adamw only (torch.optim.AdamW's defaults)
    beta2: float = 0.999
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_shape: str = "linear"
    warmup_start_factor: float = 0.01
    eval_batch_size: int = 1000
    sync_every_steps: int = 10  # host reads the per-step losses this often (divergence latency)
    compile: bool | str = "auto"  # torch.compile: true, false, or auto (CUDA only; pack.py)
    bf16: bool = True  # autocast on CUDA only
    channels_last: bool = True  # the layout models and batches train in (models.memory_format)
    fuse: int | str = 1  # trials trained together as one grouped network; "auto": see pack.py


@dataclass(frozen=True)
class DivergenceSpec:
    enabled: bool = True
    loss_factor: float = 4.0  # loss above factor x early reference ...
    patience_steps: int = 20  # ... for this many consecutive steps means diverged
    reference_steps: int = 10  # the reference is the lowest loss of the first steps
    # Loss above ceiling_factor x min(lowest loss so far, chance level ln C) is divergence at
    # once. 100: resnet8 runs on the shared subset peaked at 2.4x (4.8x if left at chance), a
    # 2-epoch resnet20 at LR 2 at 8.4x (docs/pruning.md).
    ceiling_factor: float = 100.0
    # Validation loss above val_loss_factor x ln C after an epoch is divergence. 10,000: early
    # val_loss reached 39x ln C in a healthy run and 260x in a 2-epoch resnet20 at LR 2 with
    # warmup (BatchNorm statistics still settling); an explosion gives ~1e7x.
    val_loss_factor: float = 10000.0


@dataclass(frozen=True)
class ObjectiveSpec:
    metric: str = "val_acc"
    direction: str = "maximize"


@dataclass(frozen=True)
class SamplerSpec:
    type: str = "tpe"
    n_startup_trials: int = 10
    multivariate: bool = True


@dataclass(frozen=True)
class PrunerSpec:
    type: str = "median"
    params: Mapping[str, Any] = field(default_factory=dict)
    wrapped: "PrunerSpec | None" = None  # for type 'patient'
    per: str | None = None  # prune within groups of this categorical parameter (pruning.py)


@dataclass(frozen=True)
class StudySpec:
    name: str
    description: str
    path: Path
    seed: int
    trials: int
    objective: ObjectiveSpec
    sampler: SamplerSpec
    pruner: PrunerSpec
    divergence: DivergenceSpec
    data: DataSpec
    train: TrainSpec
    space: SearchSpace
    raw: Mapping[str, Any]  # the validated document, for logging the study file as data

    @property
    def steps_per_epoch(self) -> int:
        return self.data.train_size // self.train.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.train.epochs


