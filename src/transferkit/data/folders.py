"""Image folders: listing, headers, the memory decision,
decoding (cached) or streaming from the files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .. import cache, runtime
from ..errors import TransferkitError
from .images import IMAGE_EXTENSIONS, UnreadableImage, image_size, walk_images
from .preprocess import Preprocessing
from .splits import DataSource, LabelList, Split, label_counts, stratified_subset

log = logging.getLogger(__name__)

# a split's readable files: paths, labels (class indices or multi-hot rows), (width, height) and
# content hashes
Listed = tuple[list[Path], LabelList, list[tuple[int, int]], list[bytes]]


class FileImages:
    """The images of a split too large to hold in memory: files, decoded when a batch needs them.

    Indexing gives uint8 tensors like an in-memory split, stored by the same rule at the same side.
    """

    def __init__(self, paths: list[Path], preprocessing: Preprocessing, side: int) -> None:
        self.paths, self.preprocessing, self.side = paths, preprocessing, side
        self.shape = (len(paths), 3, side, side)

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, index: torch.Tensor) -> FileImages:
        return FileImages([self.paths[i] for i in torch.as_tensor(index).tolist()],
                          self.preprocessing, self.side)

    def __getitem__(self, index) -> torch.Tensor:
        """The images at `index`, for pictures: a file that can no longer be read shows black
        (training and scoring read `batch`, which leaves such files out)."""
        picked = self.paths[index] if isinstance(index, slice) else [
            self.paths[i] for i in torch.as_tensor(index).view(-1).tolist()]
        out = torch.zeros((len(picked), 3, self.side, self.side), dtype=torch.uint8)
        unread = [(str(p), why) for i, p in enumerate(picked) if (why := self._read(out, i, p))]
        if unread:
            log.warning("%d image(s) could no longer be read, e.g. %s (%s)", len(unread),
                        *unread[0])
        return out

    def batch(self, index: torch.Tensor, labels: torch.Tensor, rows: slice | None = None,
              fill: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        """The images of `index` with their `labels`, and the files that could no longer be read
        [(path, why)]. `rows`: only these positions are decoded (a torchrun process's share; the
        others stay zero). An unreadable file is never used: its row is dropped or, with `fill`
        (training), taken by a readable image of the same batch with its own label, so that the
        batch keeps its size (its passes, BatchNorm and the processes' shares stay as planned).
        A batch of which no image reads comes back empty."""
        picked = [self.paths[i] for i in torch.as_tensor(index).view(-1).tolist()]
        out = torch.zeros((len(picked), 3, self.side, self.side), dtype=torch.uint8)
        labels = labels.clone()
        mine = range(len(picked)) if rows is None else range(*rows.indices(len(picked)))
        unread = [(i, why) for i in mine if (why := self._read(out, i, picked[i]))]
        gone = [i for i, _ in unread]
        if not fill:
            kept = [i for i in range(len(picked)) if i not in gone]
            out, labels = out[kept], labels[kept]
        elif gone:
            donors = [i for i in mine if i not in gone] or self._donor(out, picked, mine)
            if not donors:
                out, labels = out[:0], labels[:0]
            for k, i in enumerate(gone if donors else []):
                out[i], labels[i] = out[donors[k % len(donors)]], labels[donors[k % len(donors)]]
        return out, labels, [(str(picked[i]), why) for i, why in unread]

    def _read(self, out: torch.Tensor, i: int, path: Path) -> str | None:
        """Decode `path` into out[i]; why it could not be read, or None."""
        try:
            out[i] = self.preprocessing.read(path, self.side)
        except UnreadableImage as e:
            return str(e).replace(f": '{path}'", "")  # the path is said beside it
        return None

    def _donor(self, out: torch.Tensor, picked: list[Path], mine: range) -> list[int]:
        """A readable image of the batch outside this process's rows (all of its own are gone)."""
        for i in (i for i in range(len(picked)) if i not in mine):
            if self._read(out, i, picked[i]) is None:
                return [i]
        return []

    def __str__(self) -> str:
        # what cache keys see: the files (paths, sizes, times) and how they are stored
        p = self.preprocessing
        return cache.digest("files", file_stats(self.paths), *p.storage_key, self.side)


# When more than this share of a split's images can no longer be read during a run, it stops (with a
# checkpoint) instead of going on without them: a renamed or unmounted folder, not a stray file.
VANISHED_SHARE = 0.05


class DataChanged(TransferkitError):
    """Files that were read when the run started could no longer be read."""


def vanished(word: str, unread: list[tuple[str, str]], count: int, total: int,
             share: float = VANISHED_SHARE) -> str | None:
    """The sentence that stops a run when more than `share` of a split's `total` images (`count`
    of them, `unread` this process's) could no longer be read; None while fewer."""
    if count <= share * total:
        return None
    path, why = unread[0] if unread else ("(in another process)", "")
    return (f"the data changed under the run: {count} of {total} {word} images could no longer "
            f"be read, e.g. {path}" + (f" ({why})" if why else ""))


def without_files(split: Split, unread: list[tuple[str, str]]) -> Split:
    """`split` without the files in `unread` (what was scored, for the report's error analysis)."""
    gone = {p for p, _ in unread}
    if not gone or split.files is None:
        return split
    return split.subset(torch.tensor([i for i, f in enumerate(split.files) if f not in gone],
                                     dtype=torch.int64))


def load_folder(root: Path, pre: Preprocessing, splits: Sequence[str], *, workers: int = 2,
                max_train: int | None = None, seed: int = 0, use_cache: bool = True,
                stream: str = "auto") -> DataSource:
    """The splits of an image folder (see load_source), with the bytes their stored images take."""
    layout, classes = folder_classes(root)
    out = DataSource(name=str(root), classes=classes)
    lists = {split: _list_files(path, classes) for split, path in layout.items() if split in splits}
    return load_listed(out, layout, lists, pre, workers=workers, max_train=max_train, seed=seed,
                       use_cache=use_cache, stream=stream)


def load_listed(out: DataSource, where: dict[str, Path],
                lists: dict[str, tuple[list[Path], LabelList]], pre: Preprocessing, *,
                workers: int, max_train: int | None, seed: int, use_cache: bool,
                stream: str) -> DataSource:
    """`out` with the splits of `lists` ({split: (files, labels)}, `where` each was listed from:
    a folder or a label file): headers and hashes read, then decoded (cached) or streamed."""
    listed = {split: _list_split(split, where[split], *files, out, workers=workers,
                                 max_train=max_train, seed=seed, use_cache=use_cache)
              for split, files in lists.items()}
    out.stored_bytes = sum(pre.stored_bytes(sizes) for _, _, sizes, _ in listed.values())
    streaming = _streams(Path(out.name), out.stored_bytes, stream)
    for split, files in listed.items():
        side = pre.stored_side(files[2])
        if streaming:
            setattr(out, split, _file_split(split, files, pre, side))
        else:
            setattr(out, split, _decoded_split(split, where[split], files, pre, side, out,
                                               workers=workers, use_cache=use_cache))
    return out


def _list_split(split: str, path: Path, paths: list[Path], labels: LabelList, out: DataSource, *,
                workers: int, max_train: int | None, seed: int, use_cache: bool) -> Listed:
    """A split's readable files (paths, labels, sizes, hashes), recorded in `out.listed`."""
    classes = out.classes
    out.listed[split] = (paths, labels)  # what the run's fingerprint records
    if not paths:
        raise TransferkitError(f"no image files under {path} "
                               f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    empty = _without_images(classes, labels)
    if split == "train" and empty:
        raise TransferkitError(f"class folder(s) without images in {path}: "
                               f"{', '.join(empty)}; a class needs training images: add some, "
                               "or remove the folder(s)")
    if split == "train" and max_train:
        keep = stratified_subset(torch.tensor(labels), max_train, seed).tolist()
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    files = _readable(split, paths, labels, workers, use_cache, out.skipped)
    if split == "train":
        _check_every_class_reads(path, classes, files[1])
    return files


def _streams(root: Path, stored_bytes: int, stream: str) -> bool:
    """Whether to stream the folder from its files (`stream`, else by size), logged with why."""
    allowed = runtime.memory_bytes() / 4
    streaming = stream == "always" or (stream == "auto" and stored_bytes > allowed)
    log.info("%s: its decoded images take %.2f GB (a quarter of this process's memory is "
             "%.2f GB): %s", root, stored_bytes / 1e9, allowed / 1e9,
             "kept in memory (--stream never)" if stream == "never" else
             ("streaming it from its files" + (" (--stream always)" if stream == "always" else "")
              if streaming else "kept in memory"))
    return streaming


def _file_split(split: str, files: Listed, pre: Preprocessing, side: int) -> Split:
    """A split streamed from its files, decoded when a batch needs them."""
    paths, labels, _, hashes = files
    images = FileImages(paths, pre, side)
    return Split(split, images, torch.tensor(labels, dtype=torch.int64),
                 [str(p) for p in paths], hashes)


def _decoded_split(split: str, path: Path, files: Listed, pre: Preprocessing, side: int,
                   out: DataSource, *, workers: int, use_cache: bool) -> Split:
    """A split decoded into memory (or read from the cache), with the files it kept."""
    paths, labels, _, hashes = files
    decoded = _decode_cached(split, paths, labels, pre, side, workers, out.skipped, use_cache)
    gone = {p for p, _ in out.skipped}  # files whose header read but whose pixels did not
    kept = [i for i, p in enumerate(paths) if str(p) not in gone]
    decoded.files, decoded.hashes = [str(paths[i]) for i in kept], [hashes[i] for i in kept]
    assert len(decoded.files) == len(decoded), "decoded images and their files out of step"
    if split == "train":  # a class may have lost every file to pixels that did not decode
        _check_every_class_reads(path, out.classes, decoded.labels)
    return decoded


def folder_layout(root: Path) -> dict[str, Path]:
    """Which split lives where: {'train': root/train, ...} or {'train': root} for a flat tree."""
    named = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    return named or {"train": root}


def folder_classes(root: Path) -> tuple[dict[str, Path], list[str]]:
    """The folder's layout and its class names, the same in every split (or a clear error)."""
    layout = folder_layout(root)
    first = next(iter(layout.values()))
    classes = _class_dirs(first)
    if not classes:
        raise TransferkitError(f"no class folders in {first}; "
                               f"expected {first}/<class name>/<image files>")
    for path in layout.values():
        other = _class_dirs(path)
        if other != classes:
            missing, extra = sorted(set(classes) - set(other)), sorted(set(other) - set(classes))
            raise TransferkitError(
                f"classes in {path} differ from {first}: missing {missing or 'none'}, "
                f"extra {extra or 'none'}; every split needs the same class folders"
            )
    return layout, classes


def _class_dirs(root: Path) -> list[str]:
    try:
        return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as e:
        raise TransferkitError(f"{root} could not be read ({e.strerror or e}); give this user "
                               f"read access (chmod -R u+rX {root})") from None


def _list_files(root: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels, unreadable = [], [], []
    for i, c in enumerate(classes):
        found, left_out = walk_images(root / c, unreadable)
        if left_out:
            log.warning("%s: left out %d folder(s) or file(s) reached again through links, e.g. %s",
                        root / c, len(left_out), "; ".join(left_out[:3]))
        paths += found
        labels += [i] * len(found)
    if unreadable:  # else a folder this process may not open reads as a class without images
        shown = "; ".join(f"{os.path.relpath(f, root)} ({why})" for f, why in unreadable[:5])
        raise TransferkitError(f"{len(unreadable)} folder(s) in {root} could not be read: {shown}"
                               "; give this user read access (chmod -R u+rX FOLDER), or move "
                               "the folder(s) out of the data")
    return paths, labels


def file_stats(paths: list[Path]) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime) of each file: what says whether a cached result still holds."""
    stats = []
    for p in paths:
        try:
            st = p.stat()
            stats.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(p), -1, -1))
    return stats


HASH_BYTES = 16


def file_hash(path: Path) -> bytes:
    """A digest of the file's bytes: equal for exact copies
    (and links to one file), whatever their names."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=HASH_BYTES)).digest()


def _without_images(classes: list[str], labels: LabelList | torch.Tensor) -> list[str]:
    """The classes no image of `labels` has (multi-label: the labels no image carries)."""
    counts = label_counts(torch.as_tensor(labels, dtype=torch.int64), len(classes)).tolist()
    return [c for c, n in zip(classes, counts) if n == 0]


def _check_every_class_reads(path: Path, classes: list[str],
                             labels: LabelList | torch.Tensor) -> None:
    """A class whose training files all failed to read would add an output that never trains."""
    unread = _without_images(classes, labels)
    if unread and path.is_file():  # a label file
        raise TransferkitError(f"label(s) of {path} without a readable training image: "
                               f"{', '.join(unread)} (the warnings above say why each file was "
                               "skipped); add images that open, or drop those labels")
    if unread:
        raise TransferkitError(f"class folder(s) in {path} without a readable image: "
                               f"{', '.join(unread)} (the warnings above say why each file was "
                               "skipped); add images that open, or remove the folder(s)")


def _readable(
    name: str, paths: list[Path], labels: LabelList, workers: int, use_cache: bool,
    skipped: list[tuple[str, str]],
) -> Listed:
    """The files whose header reads as an image, with their labels, (width, height) and content
    hash; the rest are listed in `skipped` with the reason. Sizes and hashes are cached like decoded
    images (keyed by paths, sizes, mtimes); files that failed are read again each time (a permission
    or a plugin may have been fixed since)."""
    def header(p: Path) -> tuple[tuple[int, int] | str, bytes]:
        try:
            # reading the bytes costs little next to decoding them
            return image_size(p), file_hash(p)
        except UnreadableImage as e:
            return str(e), b""
        except OSError as e:
            return f"cannot read it ({e.strerror or e})", b""

    key = cache.digest("headers", file_stats(paths))
    hit = cache.load("headers", key) if use_cache else None
    # entries from before hashes were kept are built again
    if hit is not None and "hashes" in hit[0]:
        sizes, raw = hit[0]["sizes"].tolist(), hit[0]["hashes"].numpy().tobytes()
        found = [(tuple(s), raw[i * HASH_BYTES:(i + 1) * HASH_BYTES]) if s[0] >= 0 else header(p)
                 for i, (p, s) in enumerate(zip(paths, sizes))]
    else:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            found = list(pool.map(header, paths, chunksize=256))
        if use_cache:
            sizes = torch.tensor([s if isinstance(s, tuple) else (-1, -1) for s, _ in found],
                                 dtype=torch.int64)
            raw = b"".join(h or bytes(HASH_BYTES) for _, h in found)
            digests = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, HASH_BYTES)
            cache.store("headers", key, {"sizes": sizes.view(-1, 2), "hashes": digests})
    hashes = [h for _, h in found]
    found = [s for s, _ in found]
    keep = [i for i, s in enumerate(found) if isinstance(s, tuple)]
    for p, s in zip(paths, found):
        if isinstance(s, str):
            skipped.append((str(p), s))
            log.warning("skipping unreadable image %s: %s", p, s)
    if not keep:
        raise TransferkitError(f"none of the {len(paths)} image files in the {name} split "
                               "could be read")
    return ([paths[i] for i in keep], [labels[i] for i in keep], [found[i] for i in keep],
            [hashes[i] for i in keep])


def _decode_cached(name, paths, labels, pre: Preprocessing, side: int, workers, skipped,
                   use_cache: bool) -> Split:
    """Decode once; later runs on the same files
    (same paths, sizes, mtimes), stored alike, read the cache."""
    if not use_cache:
        return _decode(name, paths, labels, pre, side, workers, skipped)
    key = cache.digest("stored", *pre.storage_key, side, file_stats(paths), list(labels))
    hit = cache.load("decoded", key)
    if hit is not None:
        tensors, meta = hit
        skipped += [tuple(x) for x in json.loads(meta.get("skipped", "[]"))]
        log.info("%s: %d decoded images from the cache", name, len(tensors["labels"]))
        return Split(name, tensors["images"], tensors["labels"])
    mine: list[tuple[str, str]] = []
    split = _decode(name, paths, labels, pre, side, workers, mine)
    skipped += mine
    cache.store("decoded", key, {"images": split.images, "labels": split.labels},
                {"skipped": json.dumps(mine)})
    return split


def _decode(name, paths, labels, pre: Preprocessing, side: int, workers, skipped) -> Split:
    def load(p: Path) -> torch.Tensor | str:
        try:
            return pre.read(p, side)
        except UnreadableImage as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        loaded = list(pool.map(load, paths, chunksize=64))
    images, keep = [], []
    for p, y, img in zip(paths, labels, loaded):
        if isinstance(img, str):
            skipped.append((str(p), img))
            log.warning("skipping unreadable image %s: %s", p, img)
        else:
            images.append(img)
            keep.append(y)
    if not images:
        raise TransferkitError(f"none of the {len(paths)} image files in the {name} split "
                               "could be read")
    return Split(name, torch.stack(images), torch.tensor(keep, dtype=torch.int64))
