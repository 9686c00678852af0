"""The Python API as a caller meets it: what a call leaves behind, what it needs, what it refuses."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import transferkit.training.fit as fit
from conftest import cifar_folder, needs_cifar
from transferkit import Predictor, TrainConfig, TransferkitError, evaluate_run, train
from transferkit.checkpoint import ModelCard, save_model
from transferkit.data.preprocess import Preprocessing
from transferkit.models import create_backbone


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cifar_folder(tmp_path_factory, "api", 8, 4, ["airplane", "cat"])


@needs_cifar
def test_train_lr_find_and_predictor_leave_the_callers_random_generators_as_they_found_them(tiny, tmp_path):
    """The caller's next random numbers (random, numpy, torch) are the ones they would have been without the
    calls; the runs seed generators of their own (their reproducibility is the resume tests')."""
    def seeded():
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seeded()
    expected = draws()
    seeded()
    settings = dict(data=str(tiny), model="resnet18", weights="none", image_size=32, epochs=1, batch_size=4,
                    strategy="linear", workers=0, device="cpu")
    result = train(TrainConfig.create(**settings, out=str(tmp_path / "run")))
    fit.find_lr(TrainConfig.create(**settings, out=str(tmp_path / "lr")), steps=10)
    Predictor.from_run(result.out_dir, device="cpu")
    assert draws() == expected


def test_train_and_lr_find_without_data_ask_for_it_and_start_nothing(tmp_path, monkeypatch):
    """As the CLI requires --data, the library does not start a default Fashion-MNIST job."""
    def started(*args, **kwargs):
        raise AssertionError("a run started without data")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fit, "prepare", started)
    for call in (lambda: train(), lambda: train(TrainConfig()), lambda: train(None, epochs=1),
                 lambda: fit.find_lr(TrainConfig.create(recipe="fast"))):
        with pytest.raises(TransferkitError, match=r"no data to train on: pass data="):
            call()
    assert not (tmp_path / "runs").exists()
    assert TrainConfig.create(recipe="demo").data == "fashion-mnist"  # `transferkit demo` names its data


@pytest.fixture
def predictor(tmp_path):
    bb = create_backbone("resnet18", "none", num_classes=3)
    save_model(tmp_path, bb.model.eval(), ModelCard("resnet18", bb.head, ["a", "b", "c"], Preprocessing(32, 37)))
    return Predictor.from_run(tmp_path, device="cpu")


@pytest.mark.parametrize(("call", "message"), [
    (lambda p, x: p.predict(None), r"Predictor.predict\(\): images takes a str, a Path, .* not None"),
    (lambda p, x: p.predict(x, topk="2"), r"topk takes an int, not '2' \(str\)"),
    (lambda p, x: p.predict_paths([None]), r"paths\[0\] takes a str or a Path, not None"),
    (lambda p, x: Predictor.from_run(None), r"run_dir takes a str or a Path, not None"),
    (lambda p, x: train({"data": "x"}), r"train\(\): config takes a TrainConfig or None, not \{'data': 'x'\}"),
    (lambda p, x: TrainConfig.from_yaml(None), r"path takes a str or a Path, not None"),
    (lambda p, x: list(p.predict_files(b"a/photo.jpg")), r"files takes an iterable, a str or a Path, not b'a/"),
    (lambda p, x: evaluate_run("run", batch_size="3"), r"evaluate_run\(\): batch_size takes an int, not '3'"),
])
def test_the_public_calls_refuse_a_wrong_type_naming_the_argument(predictor, call, message):
    """A TransferkitError (also a TypeError) that names the argument and what it takes, not a TypeError or
    AttributeError from deep inside."""
    x = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(TransferkitError, match=message) as caught:
        call(predictor, x)
    assert isinstance(caught.value, TypeError)
    assert len(predictor.predict(x, topk=np.int64(2))[0]) == 2  # numpy's integers are integers


def test_topk_below_one_is_refused_not_answered_with_one_class(predictor):
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    for call in (lambda: predictor.predict(image, topk=0), lambda: list(predictor.predict_files(["x.png"], topk=-1))):
        with pytest.raises(TransferkitError, match=r"at least 1 class per image"):
            call()
