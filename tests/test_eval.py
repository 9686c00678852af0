"""eval: the run's own held-out split by default, bad numbers and folders refused, a read-only run folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED_CIFAR, link_subset, needs_cifar, run_cli
from transferkit.checkpoint import ModelCard, save_model
from transferkit.data.preprocess import Preprocessing
from transferkit.models import create_backbone


@pytest.fixture(scope="module")
def run_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """A run folder (random resnet18, classes a, b, c) and a data folder with a test/ split of those classes."""
    run, data = tmp_path_factory.mktemp("run"), tmp_path_factory.mktemp("data")
    bb = create_backbone("resnet18", "none", num_classes=3)
    save_model(run, bb.model.eval(), ModelCard("resnet18", bb.head, ["a", "b", "c"], Preprocessing(32, 37),
                                               data=str(data)))
    for k, c in enumerate("abc"):
        (data / "test" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (80 * k, 30 * i, 90)).save(data / "test" / c / f"{i}.png")
    return run, data


def _immutable(path: Path, on: bool) -> bool:
    """chattr +i / -i: even root cannot write into an immutable folder (tests run as root)."""
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_eval_on_a_read_only_run_folder_prints_its_figures_and_says_where_it_could_not_write(run_and_data,
                                                                                            tmp_path):
    run, data = run_and_data
    for old in run.glob("eval-*"):
        old.unlink()
    if not _immutable(run, True):
        pytest.skip("chattr +i does not work here")
    try:
        assert not _writable(run)
        proc = run_cli("eval", run, "--data", data)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        assert "accuracy" in proc.stdout and "(3 images)" in proc.stdout
        said = [line for line in proc.stderr.splitlines() if "could not write" in line]
        assert len(said) == 1 and str(run) in said[0] and "--report-dir" in said[0], proc.stderr
        assert not list(run.glob("eval-*")) and not list(run.glob(".*tmp"))
        proc = run_cli("eval", run, "--data", data, "--report-dir", tmp_path / "reports", "--json")
        assert proc.returncode == 0 and json.loads(proc.stdout)["images"] == 9, proc.stderr
        assert (tmp_path / "reports" / f"eval-{data.name}-test.md").is_file()
        assert (tmp_path / "reports" / f"eval-{data.name}-test.json").is_file()
    finally:
        _immutable(run, False)


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-5"], "--batch-size -5"),
    (["--split", "val"], "no 'val' split"),
])
def test_eval_refuses_bad_settings_with_a_sentence(run_and_data, args, message):
    run, data = run_and_data
    proc = run_cli("eval", run, "--data", data, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert _errors(proc) == 1, proc.stderr


def _errors(proc: subprocess.CompletedProcess) -> int:
    """How many error lines (one sentence each) stderr holds, besides the progress it logs."""
    return sum(line.startswith("error:") for line in proc.stderr.splitlines())


def test_eval_and_predict_on_folders_that_are_not_runs_say_so(run_and_data, tmp_path, capsys):
    run, data = run_and_data
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "model.json").unlink()
    (tmp_path / "afile").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    nomodel = tmp_path / "nomodel"
    shutil.copytree(run, nomodel)
    (nomodel / "model.safetensors").unlink()
    proc = run_cli("predict", run, "/dev/null")
    assert proc.returncode == 2 and "not a file or folder" in proc.stderr and "Traceback" not in proc.stderr
    for folder, message in [(broken, "not a transferkit run folder"), (tmp_path / "afile", "not a transferkit run"),
                            (empty, "not a transferkit run folder"), (tmp_path / "nowhere", "not a transferkit run"),
                            (nomodel, "model.safetensors is missing")]:
        for proc in (run_cli("eval", folder, "--data", data), run_cli("eval", folder),
                     run_cli("predict", folder, data)):
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert message in proc.stderr and _errors(proc) == 1, proc.stderr


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real 1-epoch run on a flat root/<class>/ folder: its validation split is carved out of train."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("flat")
    flat = link_subset(SHARED_CIFAR / "train", root / "flat", 12, ["cat", "dog", "ship"])
    run = root / "run"
    proc = run_cli("train", "--data", flat, "--model", "resnet18", "--weights", "none", "--strategy", "linear",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "9", "--val-split", "0.25", "--workers", "1",
                   "--out", run)
    assert proc.returncode == 0, proc.stderr
    return run, flat


@needs_cifar
def test_eval_of_a_run_scores_the_validation_split_it_held_out_not_its_training_images(flat_run):
    run, flat = flat_run
    trained = json.loads((run / "report.json").read_text())  # no test split: measured on the held-out 9
    assert trained["images"] == 9
    for extra in ([], ["--split", "val"], ["--data", flat]):
        proc = run_cli("eval", run, "--json", *extra)
        assert proc.returncode == 0, proc.stderr
        metrics = json.loads(proc.stdout)
        assert metrics["images"] == 9 and metrics["accuracy"] == pytest.approx(trained["accuracy"]), extra
        assert "val split" in metrics["measured_on"] and "held out" in metrics["measured_on"]
    proc = run_cli("eval", run, "--split", "train")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "27 images" in first and "trained the model" in first, first
    assert "trained the model" in (run / f"eval-{flat.name}-train.md").read_text()


@needs_cifar
def test_eval_of_an_old_run_without_a_split_record_warns_and_says_what_it_evaluated(flat_run, tmp_path):
    run, flat = flat_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "split.json").unlink(missing_ok=True)  # as a run of an earlier transferkit
    proc = run_cli("eval", old, "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["images"] == 9 and "re-carved" in metrics["measured_on"]
    assert "warning:" in proc.stderr and "records no held-out split" in proc.stderr
    (old / "split.json").write_text('{"format": 1}')  # damaged: read as no record, not a traceback
    proc = run_cli("eval", old, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["images"] == 9, proc.stderr
    assert "split.json is unreadable" in proc.stderr and "records no held-out split" in proc.stderr


@needs_cifar
def test_the_held_out_split_has_one_fingerprint_in_memory_and_streamed(flat_run):
    """A run that streamed its images and an eval that holds them in memory (or the reverse) agree."""
    from transferkit.data import heldout

    run, flat = flat_run
    record = json.loads((run / "split.json").read_text())
    pre = Preprocessing(32, 37)
    prints = set()
    for stream in ("always", "never"):
        src = heldout.load_source(str(flat), preprocessing=pre, splits=("train",), stream=stream)
        src.val = src.test = None
        _, val, _ = heldout.train_val_test(src, record["val_split"], record["seed"])
        assert val.streamed == (stream == "always")
        prints.add(heldout.fingerprint(val))
    assert prints == {record["val"]["fingerprint"]}


@needs_cifar
def test_eval_of_a_dedupe_run_scores_the_validation_split_it_kept(tmp_path):
    """--dedupe dropped val images that copy training images; eval RUN drops the same ones."""
    flat = link_subset(SHARED_CIFAR / "train", tmp_path / "flat", 12, ["cat", "dog", "ship"])
    for f in sorted((flat / "cat").iterdir()):  # every cat twice: carving puts some pairs on both sides
        (flat / "cat" / f"copy_{f.name}").write_bytes(f.read_bytes())  # a copy, not a link (links count once)
    run = tmp_path / "run"
    proc = run_cli("train", "--data", flat, "--model", "resnet18", "--weights", "none", "--strategy", "linear",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "9", "--val-split", "0.25", "--workers", "1",
                   "--dedupe", "--out", run)
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((run / "report.json").read_text())
    assert trained["images"] < 12, "no copy landed in val: the test needs another seed"  # 6 + 3 + 3 before
    proc = run_cli("eval", run, "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["images"] == trained["images"] and metrics["accuracy"] == pytest.approx(trained["accuracy"])


def _flat_run_of_16(tmp_path: Path) -> tuple[Path, Path]:
    """A flat folder of 8 cats and 8 dogs, and a 1-epoch run on it that held out 4 of them."""
    flat = link_subset(SHARED_CIFAR / "train", tmp_path / "flat", 8, ["cat", "dog"])
    run = tmp_path / "run"
    proc = run_cli("train", "--data", flat, "--model", "resnet18", "--weights", "none", "--strategy", "linear",
                   "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--val-split", "0.25", "--workers", "1",
                   "--out", run)
    assert proc.returncode == 0, proc.stderr
    return flat, run


@needs_cifar
def test_eval_refuses_a_held_out_split_whose_files_changed_since_training(tmp_path):
    flat, run = _flat_run_of_16(tmp_path)
    held = json.loads((run / "split.json").read_text())["val"]["files"]
    assert len(held) == 4 and run_cli("eval", run).returncode == 0
    changed = flat / held[0]
    other = next(f for f in sorted((SHARED_CIFAR / "test" / changed.parent.name).iterdir()))
    changed.unlink()
    changed.write_bytes(other.read_bytes())  # same name, same class, other pixels
    for extra in ([], ["--image-size", "48"]):
        proc = run_cli("eval", run, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "the data changed since training" in proc.stderr and "other images" in proc.stderr


@needs_cifar
def test_eval_on_the_run_s_data_moved_elsewhere_still_scores_the_held_out_split(tmp_path):
    flat, run = _flat_run_of_16(tmp_path)
    moved = flat.rename(tmp_path / "moved")
    proc = run_cli("eval", run, "--data", moved, "--json")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["images"] == 4 and "held out" in metrics["measured_on"]


def test_eval_of_a_run_still_training_says_so_and_leaves_no_report_in_its_folder(run_and_data, tmp_path):
    """While another process holds the run folder's lock (a run training), eval scores the best model so far and
    says which epoch it is from; its report would answer for an older model once training ends, so none is left
    in the run folder (--report-dir writes one elsewhere). Once the lock is released the report is written."""
    import fcntl

    from transferkit.checkpoint import update_card

    run, data = run_and_data
    training = tmp_path / "training"
    shutil.copytree(run, training, ignore=shutil.ignore_patterns("eval-*"))
    update_card(training, best_epoch=2, epochs_trained=2)
    with open(training / ".lock", "a+") as lock:  # what `train` holds for the whole run
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242\n")
        lock.flush()
        proc = run_cli("eval", training, "--data", data)
        assert proc.returncode == 0, proc.stderr
        assert "still training (process 4242)" in proc.stderr and "from epoch 2" in proc.stderr
        assert "--report-dir" in proc.stderr
        assert "the model of epoch 2, the best so far of a run still training" in proc.stdout
        assert "report:" not in proc.stdout and not list(training.glob("eval-*"))
        proc = run_cli("eval", training, "--data", data, "--report-dir", tmp_path / "elsewhere")
        assert proc.returncode == 0, proc.stderr
        assert "epoch 2" in (tmp_path / "elsewhere" / f"eval-{data.name}-test.md").read_text()
        assert not list(training.glob("eval-*"))
    proc = run_cli("eval", training, "--data", data)  # training over: the report goes beside the model
    assert proc.returncode == 0 and "still training" not in proc.stderr + proc.stdout, proc.stderr
    assert (training / f"eval-{data.name}-test.md").is_file()
