"""Image sources: an ImageNet-style folder and TFDS ``imagenet2012`` (ArrayRecord).

Two layers:
  * *records* (`FolderRecords`, `TfdsRecords`): random access to (encoded bytes or path,
    label, name) without decoding — what latent caching iterates over;
  * `DecodedImages`: record -> ADM-cropped uint8 image, with corrupt or non-image files
    reported by path; the cache skips them (`decode_record`), the training source
    (`TrainImageSource`) substitutes the next readable record so batches stay full.

Folder layout: ``<data.path>/<split dir>/<class_dir>/<files>`` with split dir ``train`` (or
``val`` for split 'test'/'validation'); classes are the sorted class directory names, or come
from a labels file: one class directory name per line (label = line number), or
``<dir> <label>`` per line. Every non-hidden file is a candidate (so a stray text file is
reported, not silently ignored).

TFDS: ``tfds.data_source('imagenet2012', split, data_dir=data.path)``, which needs the dataset
prepared in ArrayRecord format; images are decoded with PIL like the folder path.

Pipeline plugin (see `emigm_jax.data.pipeline`): `make_source(config, split)` and
`random_transform(config, split)` for ``data.source`` in {folder, tfds}: examples are
``{'image': uint8 [S, S, 3], 'label': int32}``; the train step turns images into tokens with
`Tokenizer.images_to_tokens`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from emigm_jax.data.preprocess import preprocess_image

_SPLIT_DIRS = {"train": "train", "test": "val", "val": "val", "validation": "val"}
_TFDS_SPLITS = {"train": "train", "test": "validation", "val": "validation",
                "validation": "validation"}


class Records(Protocol):
    def __len__(self) -> int: ...
    def read(self, index: int) -> tuple[bytes | str, int, str]: ...


def read_labels_file(path: str) -> dict[str, int]:
    """Class-directory name -> label from a labels file (see module doc)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels file not found: {path!r}")
    mapping: dict[str, int] = {}
    with open(path) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    for i, ln in enumerate(lines):
        parts = ln.replace(",", " ").split()
        if len(parts) == 1:
            name, label = parts[0], i
        elif len(parts) == 2 and parts[1].lstrip("-").isdigit():
            name, label = parts[0], int(parts[1])
        else:
            raise ValueError(f"{path}: line {i + 1} {ln!r}: expected '<class_dir>' or "
                             "'<class_dir> <int label>'")
        if name in mapping:
            raise ValueError(f"{path}: class {name!r} listed twice")
        mapping[name] = label
    if not mapping:
        raise ValueError(f"labels file {path!r} is empty")
    return mapping


class FolderRecords:
    """``<root>/<class_dir>/**/<file>`` listing with labels; nothing is opened here."""

    def __init__(self, root: str, labels_file: str | None = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"image folder {root!r} does not exist: expected <data.path>/train/<class_dir>/"
                "<images> (ImageNet layout)")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise ValueError(f"image folder {root!r} has no class directories: expected "
                             f"{root}/<class_dir>/<images>")
        if labels_file:
            mapping = read_labels_file(labels_file)
            unknown = [c for c in classes if c not in mapping]
            if unknown:
                raise ValueError(f"class directories {unknown[:10]} (of {len(unknown)}) in {root!r} "
                                 f"are not in labels file {labels_file!r}")
        else:
            mapping = {c: i for i, c in enumerate(classes)}
        self.root = root
        self.class_to_label = {c: mapping[c] for c in classes}
        paths, labels = [], []
        for c in classes:
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, c), followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if not fn.startswith("."):
                        paths.append(os.path.join(dirpath, fn))
                        labels.append(mapping[c])
        if not paths:
            raise ValueError(f"image folder {root!r} has {len(classes)} class directories but no files")
        self.paths = paths
        self.labels = np.asarray(labels, np.int32)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> tuple[str, int, str]:
        return self.paths[index], int(self.labels[index]), os.path.relpath(self.paths[index], self.root)


class TfdsRecords:
    """TFDS ``imagenet2012`` (ArrayRecord) with undecoded image bytes."""

    def __init__(self, name: str = "imagenet2012", split: str = "train", data_dir: str | None = None,
                 data_source: Sequence[dict] | None = None):
        if data_source is None:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
            try:
                data_source = tfds.data_source(
                    name, split=split, data_dir=data_dir or None, download=False,
                    decoders={"image": tfds.decode.SkipDecoding()})
            except Exception as e:  # tfds raises several error types for "not prepared"
                raise FileNotFoundError(
                    f"TFDS dataset {name!r} split {split!r} not readable under data_dir="
                    f"{data_dir or '<default>'}: it must be prepared in ArrayRecord format, e.g. "
                    f"`tfds build {name} --file_format=array_record --data_dir=... "
                    f"--manual_dir=<dir with ILSVRC2012 tars>` ({type(e).__name__}: {e})") from e
        if len(data_source) == 0:
            raise ValueError(f"TFDS dataset {name!r} split {split!r} is empty")
        self.source = data_source
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def read(self, index: int) -> tuple[bytes, int, str]:
        ex = self.source[index]
        fname = ex.get("file_name", f"{self.name}/{index}")
        if isinstance(fname, (bytes, np.bytes_)):
            fname = fname.decode()
        img = ex["image"]
        if isinstance(img, np.ndarray) and img.dtype != np.uint8:  # scalar bytes array
            img = img.item()
        return img, int(ex["label"]), str(fname)


@dataclasses.dataclass
class Decoded:
    image: np.ndarray | None   # uint8 [S, S, 3] or None when unreadable
    label: int
    name: str
    error: str | None = None


def decode_record(records: Records, index: int, image_size: int) -> Decoded:
    """Reads and ADM-crops one record; unreadable data gives ``image=None`` and the error."""
    data, label, name = records.read(index)
    try:
        return Decoded(preprocess_image(data, image_size), label, name)
    except Exception as e:  # PIL raises many types for corrupt/non-image data
        return Decoded(None, label, name, f"{type(e).__name__}: {e}")


class TrainImageSource:
    """Random-access ``{'image', 'label'}`` for training on images; bad files are replaced.

    A corrupt or non-image file is logged once with its path and replaced by the next readable
    record, so every index yields an image (batches keep their size).
    """

    def __init__(self, records: Records, image_size: int, max_tries: int = 64):
        self.records, self.image_size, self.max_tries = records, image_size, max_tries
        self._bad: set[str] = set()  # per process (grain workers each keep their own)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_skipped(self) -> int:
        return len(self._bad)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        for k in range(self.max_tries):
            d = decode_record(self.records, (int(index) + k) % n, self.image_size)
            if d.image is not None:
                return {"image": d.image, "label": np.int32(d.label)}
            if d.name not in self._bad:
                self._bad.add(d.name)
                logging.warning("skipping unreadable image %s (%s); %d skipped so far",
                                d.name, d.error, len(self._bad))
        raise RuntimeError(f"{self.max_tries} consecutive unreadable images from index {index}")


def make_records(config, split: str = "train", labels_file: str | None = None,
                 source: str | None = None) -> Records:
    """Records for ``config.data.source`` (or ``source``) in {folder, tfds}."""
    source = source or config.data.source
    path = config.data.get("path", "")
    if source == "folder":
        if split not in _SPLIT_DIRS:
            raise ValueError(f"split {split!r}: expected one of {sorted(_SPLIT_DIRS)}")
        if not path:
            raise ValueError("config.data.path is empty: set it to the ImageNet root holding train/")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"config.data.path={path!r} does not exist")
        labels_file = labels_file or config.data.get("labels_file", None) or None
        return FolderRecords(os.path.join(path, _SPLIT_DIRS[split]), labels_file)
    if source == "tfds":
        if split not in _TFDS_SPLITS:
            raise ValueError(f"split {split!r}: expected one of {sorted(_TFDS_SPLITS)}")
        return TfdsRecords(config.data.get("tfds_name", "imagenet2012"), _TFDS_SPLITS[split],
                           data_dir=path or None)
    raise ValueError(f"image source {source!r}: expected 'folder' or 'tfds'")


def make_source(config, split: str = "train") -> TrainImageSource:
    """Pipeline plugin: ADM-cropped images of ``config.data.image_size``."""
    return TrainImageSource(make_records(config, split), int(config.data.image_size))


def random_flip(example: dict, rng: np.random.Generator) -> dict:
    """Horizontal flip with probability 1/2 (a module-level function: picklable for workers)."""
    if rng.random() < 0.5:
        example = dict(example, image=np.ascontiguousarray(example["image"][:, ::-1]))
    return example


def random_transform(config, split: str = "train") -> Callable | None:
    """Pipeline plugin: random horizontal flip (training only)."""
    del config
    return random_flip if split == "train" else None
