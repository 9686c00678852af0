"""The run folder: made only when a run writes, never half-written, resumed only on its own data and settings,
found again from any directory (issue 13 items 6, 8, 9, 10, 15)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SHARED_CIFAR, link_subset, needs_weights, run_cli
from transferkit.errors import TransferkitError

CLASSES = ["airplane", "cat", "ship"]


@pytest.fixture
def data(tmp_path) -> Path:
    """A tiny folder of its own per test (tests delete and change its files): train/ 12 and test/ 6 per class."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder not found at {SHARED_CIFAR}")
    root = tmp_path / "data"
    link_subset(SHARED_CIFAR / "train", root / "train", 12, CLASSES)
    link_subset(SHARED_CIFAR / "test", root / "test", 6, CLASSES)
    return root


def quick(data, out, *extra):
    return ["train", "--data", data, "--model", "resnet18", "--weights", "none", "--image-size", "32", "--epochs",
            "1", "--batch-size", "8", "--val-split", "0.25", "--strategy", "linear", "--workers", "1", "--out", out,
            *extra]


def refused(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The CLI exited 2 with one error sentence holding `words`, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, proc.stdout + err
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1, err
    for w in words:
        assert w in line[0], line[0]
    return line[0]


def immutable(path: Path) -> None:
    """chattr +i: even root cannot create files there (root ignores chmod)."""
    proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"chattr +i does not work here ({proc.stderr.strip()}): cannot make a folder read-only for root")


@pytest.fixture
def unfreeze():
    frozen: list[Path] = []
    yield frozen
    for p in frozen:
        subprocess.run(["chattr", "-i", str(p)], capture_output=True)


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


# --- item 15: a run that fails before training leaves no run folder --------------------------------


@pytest.mark.parametrize("args", [
    ["--data", "nosuch"],
    ["--data", "{data}", "--device", "tpu"],
    ["--data", "{data}", "--model", "resnet18", "--weights", "IMAGENET1K_V1"],  # not on disk, no network here
    ["--data", "{data}/train/cat", "--model", "resnet18", "--weights", "none"],  # no class folders: found on reading
    ["--data", "{data}", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "1",
     "--workers", "1"],  # passes of one image under BatchNorm: refused after config.yaml, before training
], ids=["bad-data", "unknown-device", "weights-offline", "fails-on-data", "fails-before-training"])
def test_a_run_that_fails_before_training_leaves_no_run_folder(args, data, tmp_path):
    cwd = tmp_path / "here"
    cwd.mkdir()
    proc = run_cli("train", *[a.format(data=data) for a in args], "--epochs", "1", cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    assert list(cwd.iterdir()) == [], list(cwd.rglob("*"))  # no runs/, no runs/<data>-<model>-<time>/


def test_a_failed_run_into_new_nested_out_removes_only_what_it_made(tmp_path):
    (tmp_path / "keep").mkdir()
    proc = run_cli("train", "--data", "nosuch", "--out", tmp_path / "keep" / "a" / "b")
    assert proc.returncode == 2
    assert list((tmp_path / "keep").iterdir()) == []  # a/ and a/b/ were this run's: gone; keep/ was not


def test_a_failed_run_into_an_existing_folder_leaves_its_files_as_they_were(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    before = tree(out)
    proc = run_cli("train", "--data", tmp_path / "nosuch", "--out", out, "--overwrite")
    assert proc.returncode == 2
    after = tree(out)
    assert after.keys() == before.keys()
    assert {k: v for k, v in after.items() if k not in ("train.log", ".lock")} == {
        k: v for k, v in before.items() if k not in ("train.log", ".lock")}


# --- item 10: an --out that cannot be written, a read-only run to resume ------------------------------


def test_out_under_proc_is_refused_with_a_sentence(data):
    refused(run_cli(*quick(data, "/proc/transferkit-run")), "/proc/transferkit-run", "--out")


def test_out_naming_an_existing_file_is_refused(data, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    refused(run_cli(*quick(data, f)), str(f), "--out")
    assert f.read_text() == "mine\n"
    refused(run_cli(*quick(data, f / "run")), str(f), "--out")  # its parent is a file


def test_out_in_an_immutable_folder_is_refused_and_nothing_is_written(data, tmp_path, unfreeze):
    ro = tmp_path / "ro"
    ro.mkdir()
    immutable(ro)
    unfreeze.append(ro)
    refused(run_cli(*quick(data, ro / "run")), str(ro), "--out")
    refused(run_cli(*quick(data, ro)), str(ro), "--out")  # the folder itself exists but takes no files
    assert list(ro.iterdir()) == []


def test_resume_of_a_read_only_run_folder_is_refused_before_any_work(data, tmp_path, unfreeze):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    before = tree(out)
    immutable(out)
    unfreeze.append(out)
    refused(run_cli("train", "--resume", out, "--epochs", "2"), str(out), "read-only")
    assert tree(out) == before


# --- item 9: absolute paths, a moved data folder --------------------------------------------------------


def test_a_run_made_with_relative_paths_is_found_from_another_directory(data, tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "flat").symlink_to(data)
    proc = run_cli(*quick("flat", "runs/r1", "--data-dir", "sets"), cwd=work)
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((work / "runs/r1/config.yaml").read_text())
    assert saved["data"] == str(work / "flat") and saved["out"] == str(work / "runs/r1")
    assert saved["data_dir"] == str(work / "sets")
    run = work / "runs/r1"
    assert run_cli("eval", run, cwd=elsewhere).returncode == 0
    proc = run_cli("train", "--resume", run, "--epochs", "2", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert not (elsewhere / "flat").exists() and not (elsewhere / "runs").exists()


def test_a_moved_data_folder_is_named_with_how_to_pass_the_new_one(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    moved = tmp_path / "moved"
    data.rename(moved)
    refused(run_cli("eval", out), str(data), "--data")
    refused(run_cli("train", "--resume", out, "--epochs", "2"), str(data), "--data")
    proc = run_cli("train", "--resume", out, "--epochs", "2", "--data", moved)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((out / "config.yaml").read_text())["data"] == str(moved)
    assert run_cli("eval", out).returncode == 0


def test_resume_with_data_that_differs_is_refused_even_when_passed(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    other = link_subset(SHARED_CIFAR / "train", tmp_path / "other" / "train", 10, CLASSES)
    refused(run_cli("train", "--resume", out, "--epochs", "2", "--data", other.parent), "training image")


# --- item 6: resume checks its data and settings --------------------------------------------------------


def test_resume_after_training_images_are_deleted_says_how_many_are_gone(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    gone = sorted((data / "train" / "cat").iterdir())[:3]
    for f in gone:
        f.unlink()
    line = refused(run_cli("train", "--resume", out, "--epochs", "2"), "3 training images are gone")
    assert str(gone[0].relative_to(data)) in line


def test_resume_on_other_files_of_the_same_count_is_refused(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    f = sorted((data / "train" / "ship").iterdir())[0]
    f.unlink()
    shutil.copy(sorted((SHARED_CIFAR / "train" / "ship").iterdir())[100], f)  # same name, other image
    line = refused(run_cli("train", "--resume", out, "--epochs", "2"), "1 training image", "changed")
    assert f.name in line


def test_resume_on_a_copy_of_the_data_with_new_mtimes_goes_on_and_one_edited_byte_is_refused(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    copy = shutil.copytree(data, tmp_path / "copy", copy_function=shutil.copy)  # plain cp: new mtimes, same bytes
    edited = tmp_path / "edited"
    shutil.copytree(data, edited, copy_function=shutil.copy)
    f = sorted((edited / "train" / "cat").iterdir())[0]
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # the same size, still a JPEG, another image
    f.write_bytes(bytes(raw))
    refused(run_cli("train", "--resume", out, "--epochs", "2", "--data", edited), "1 training image", "changed")
    proc = run_cli("train", "--resume", out, "--epochs", "2", "--data", copy)
    assert proc.returncode == 0, proc.stderr


def test_resume_after_config_yaml_was_edited_says_what_changed(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    cfg = out / "config.yaml"
    saved = yaml.safe_load(cfg.read_text())
    saved["lr"] = 0.01
    cfg.write_text(yaml.safe_dump(saved, sort_keys=False))
    refused(run_cli("train", "--resume", out, "--epochs", "2"), "config.yaml", "lr 0.001 -> 0.01")


def test_a_run_of_an_earlier_version_resumes_although_it_does_not_record_newer_settings(tmp_path):
    from transferkit.config import TrainConfig
    from transferkit.training import fingerprint

    now = fingerprint.settings_record(TrainConfig(), set())
    older = {k: v for k, v in now.items() if k not in ("sampler", "calibrate")}  # settings added since
    fingerprint.check_settings(older, now, tmp_path)  # at their defaults: nothing changed
    with pytest.raises(TransferkitError, match="sampler none -> balanced"):
        fingerprint.check_settings(older, dict(now, sampler="balanced"), tmp_path)


def test_a_last_pt_without_fingerprints_still_resumes_with_a_warning(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    last = torch.load(out / "last.pt", weights_only=True)
    assert "fingerprints" in last
    del last["fingerprints"]
    torch.save(last, out / "last.pt")
    proc = run_cli("train", "--resume", out, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr
    assert "cannot check" in proc.stderr



def test_the_split_record_in_last_pt_is_split_jsons_and_an_older_last_pt_still_resumes(data, tmp_path):
    """One record of "is this the same split?" serves a resume (last.pt) and eval (split.json); a last.pt
    written before that record resumes on its own record, and a changed split is refused by name."""
    from transferkit.training import fingerprint

    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    last = torch.load(out / "last.pt", weights_only=True)
    prints = fingerprint.unpack(last)
    assert prints["splits"]["val"] == {k: v for k, v in json.loads((out / "split.json").read_text())["val"].items()
                                       if k in ("images", "per_class", "fingerprint")}
    # A last.pt of transferkit before 2026-12-07: [size, a hash of the labels] per split
    older = {name: [split["images"], "0" * 16] for name, split in prints["splits"].items()}
    last["fingerprints"] = fingerprint.pack({**prints, "splits": older})
    torch.save(last, out / "last.pt")
    refused(run_cli("train", "--resume", out, "--epochs", "2"), "splits of", "differ from the ones the run started")
    source = _carved(data)  # the real older record: the labels' hash as that version computed it
    older = {name: [len(split), hashlib.sha256(split.labels.to(torch.int64).numpy().tobytes()).hexdigest()[:16]]
             for name, split in (("train", source.train), ("val", source.val), ("test", source.test))}
    last["fingerprints"] = fingerprint.pack({**prints, "splits": older})
    torch.save(last, out / "last.pt")
    proc = run_cli("train", "--resume", out, "--epochs", "2")
    assert proc.returncode == 0, proc.stderr


def _carved(data):
    """The splits a `quick` run trains on, carved as train carves them."""
    from transferkit.data.preprocess import Preprocessing
    from transferkit.data.sources import load_source, train_val_test

    src = load_source(str(data), preprocessing=Preprocessing(32, 32), splits=("train", "val", "test"), seed=0)
    src.train, src.val, src.test = train_val_test(src, 0.25, 0)
    return src

# --- item 8: config.yaml holds the resolved settings ---------------------------------------------------------


@needs_weights
def test_config_yaml_holds_the_resolved_weights_and_preprocessing_and_reproduces_the_run(data, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--model", "mobilenet_v2", "--weights", "imagenet", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--val-split", "0.25", "--strategy", "linear", "--workers", "1"]
    assert run_cli("train", "--data", data, *args, "--out", first).returncode == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["weights"] == "IMAGENET1K_V1"
    assert saved["mean"] == pytest.approx([0.485, 0.456, 0.406]) and saved["std"] == pytest.approx(
        [0.229, 0.224, 0.225])
    assert saved["image_size"] == 32
    assert saved["requested"]["weights"] == "imagenet"
    proc = run_cli("train", "--config", first / "config.yaml", "--out", second)
    assert proc.returncode == 0, proc.stderr
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    again = yaml.safe_load((second / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k not in ("out", "requested")} == {
        k: v for k, v in saved.items() if k not in ("out", "requested")}


def test_config_yaml_resolves_the_size_and_normalization_of_random_weights(data, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*quick(data, out)).returncode == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["weights"] == "none" and saved["image_size"] == 32
    assert len(saved["mean"]) == 3 and len(saved["std"]) == 3
