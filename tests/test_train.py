"""The fast-trial contract of the training loop and the data path (issue 5), on the CPU: batched
crop/flip is exactly a padded crop (maybe mirrored) of each image, an epoch is a permutation,
normalisation is right and channels_last, the loop reports every step once with the LR the
schedule gives, and evaluation does not depend on its batch size."""

from __future__ import annotations

import optuna
import pytest
import torch

from sweep.training.data import MEAN, STD, Normalizer, Splits, augment, load_splits, train_batches
from sweep.training.models import build_model
from sweep.study.schedules import LRSchedule
from sweep.study.space import trial_config
from sweep.study.spec import parse_study
from sweep.training.train import evaluate, train

CPU = torch.device("cpu")


def test_augment_is_a_padded_crop_or_its_mirror_of_each_image():
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8)  # 0 only from padding
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    found = set()
    for i in range(len(images)):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (0, 1)
                   if torch.equal(out[i], (lambda c: c.flip(2) if flip else c)(
                       padded[i, :, dy: dy + 32, dx: dx + 32]))]
        assert matches, f"image {i} is not a crop of its padded original"
        found.update(matches)
    assert {m[2] for m in found} == {0, 1} and len({m[:2] for m in found}) > 20
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # reproducible from the generator alone


@pytest.mark.parametrize("channels_last", [True, False])
def test_normalizer_matches_the_definition(channels_last):
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    x = Normalizer(CPU, channels_last)(images)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (images.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)


def test_an_epoch_is_a_fresh_permutation_of_whole_batches():
    n, batch = 103, 10
    ids = torch.arange(n)
    splits = Splits(torch.zeros(n, 3, 32, 32, dtype=torch.uint8), ids, *[None] * 4, source="t")
    generator, normalize = torch.Generator().manual_seed(0), Normalizer(CPU, True)
    epochs = [torch.cat([y for _, y in train_batches(splits, batch, generator, normalize)])
              for _ in range(2)]
    for seen in epochs:
        assert len(seen) == n // batch * batch and len(set(seen.tolist())) == len(seen)
    assert not torch.equal(epochs[0], epochs[1])


@pytest.fixture(scope="module")
def tiny(tiny_cifar, tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "t.yaml"
    spec = parse_study("""
name: t
trials: 1
data: {train_size: 160, val_size: 40, test_size: 40}
train: {model: resnet8, epochs: 2, batch_size: 16, sync_every_steps: 3, eval_batch_size: 1000}
space: {warmup_steps: 7, base_lr: 0.2, scheduler: {step: {gamma: 0.5, step_size_epochs: 1}}}
""", str(path), path)
    return spec, load_splits(tiny_cifar, spec.data, CPU, download=False)


class Recorder:
    def __init__(self):
        self.chunks, self.lrs, self.epochs = [], [], []

    def on_steps(self, first_step, lrs, losses):
        self.chunks.append((first_step, len(lrs)))
        self.lrs.extend(lrs)
        assert len(losses) == len(lrs)

    def on_epoch_end(self, epoch, metrics):
        self.epochs.append((epoch, sorted(metrics)))


@pytest.mark.slow
def test_the_loop_reports_every_step_once_with_the_schedules_lr(tiny):
    spec, splits = tiny
    cfg = trial_config(optuna.trial.FixedTrial({}), spec)
    seen = Recorder()
    result = train(cfg, splits, CPU, [seen])
    S = spec.steps_per_epoch  # 10
    # chunks of sync_every_steps, cut at each epoch's end: 3, 3, 3, 1 per epoch
    assert seen.chunks == [(0, 3), (3, 3), (6, 3), (9, 1), (10, 3), (13, 3), (16, 3), (19, 1)]
    schedule = LRSchedule(cfg.schedule, S, spec.train.epochs)
    assert seen.lrs == pytest.approx([schedule.lr_at(t, 0.2) for t in range(2 * S)])
    assert [e for e, _ in seen.epochs] == [0, 1] and result.steps == 2 * S
    assert {"val_loss", "val_acc", "epoch_seconds"} <= set(seen.epochs[0][1])
    assert 0.0 <= result.test_acc <= 1.0 and result.compile_seconds == 0.0


def test_evaluation_does_not_depend_on_its_batch_size(tiny):
    _, splits = tiny
    torch.manual_seed(0)
    model = build_model("resnet8").to(memory_format=torch.channels_last)
    normalize = Normalizer(CPU, True)
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    whole = evaluate(model, splits.val_x, splits.val_y, normalize, 1000, no_autocast)
    pieces = evaluate(model, splits.val_x, splits.val_y, normalize, 7, no_autocast)
    assert whole[1] == pieces[1] and whole[0] == pytest.approx(pieces[0], rel=1e-4)
    assert model.training  # evaluation hands the model back in training mode


@pytest.mark.parametrize("optimizer, step_factor", [
    # One step from zero gradients leaves only the weight decay wd at LR lr. SGD (momentum m,
    # Nesterov): the step direction is g + m * buf with g = buf = wd * p, so p * (1 - lr wd (1 + m)).
    # AdamW: decoupled decay p * (1 - lr wd), and Adam's own step is 0 / (0 + eps) = 0.
    ("sgd", lambda lr, wd, m: 1 - lr * wd * (1 + m)),
    ("adamw", lambda lr, wd, m: 1 - lr * wd),
])
def test_optimizer_decays_weights_but_not_batchnorm_or_biases(tmp_path, optimizer, step_factor):
    from sweep.training.train import build_optimizer

    path = tmp_path / "t.yaml"
    spec = parse_study(f"""
name: t
trials: 1
data: {{train_size: 160, val_size: 40, test_size: 40}}
train: {{model: resnet8, epochs: 1, batch_size: 16, optimizer: {optimizer}, weight_decay: 0.01,
         momentum: 0.9}}
space: {{warmup_steps: 0, base_lr: 0.5, scheduler: {{constant: {{}}}}}}
""", str(path), path)
    cfg = trial_config(optuna.trial.FixedTrial({}), spec)
    torch.manual_seed(0)
    model = build_model("resnet8")
    # Which tensors must not decay, from the module types (not from the optimizer's own rule).
    exempt = set()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            exempt |= {id(module.weight), id(module.bias)}
        elif getattr(module, "bias", None) is not None:
            exempt.add(id(module.bias))
    assert exempt, "the model has BatchNorm layers and biases"
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__.lower() == optimizer
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    factor = step_factor(0.5, 0.01, 0.9)
    for p in model.parameters():
        expected = before[id(p)] if id(p) in exempt else before[id(p)] * factor
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0)
