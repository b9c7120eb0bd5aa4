"""MNIST from torchvision's layout (`<data_dir>/MNIST/raw/*-ubyte(.gz)`): each file verified (gzip, IDX header,
length, the SHA-256 of dataset/MNIST/raw/SHA256SUMS), decompressed beside its .gz if needed, and decoded once into
a uint8 tensor [N, 1, 28, 28] that lives on the training device (no PIL or ToTensor per sample). No data file is
ever deleted or overwritten (only a failed download's empty folders and dead processes' temp files are removed): a
bad file is reported, one line naming it, and left for the user.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass

import torch

from lib import files
from lib.checks import UserError, first_line

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dataset")

# name -> shape; every file holds unsigned bytes (IDX type 0x08). http://yann.lecun.com/exdb/mnist/
FILES = {"train-images-idx3-ubyte": (60000, 28, 28), "train-labels-idx1-ubyte": (60000,),
         "t10k-images-idx3-ubyte": (10000, 28, 28), "t10k-labels-idx1-ubyte": (10000,)}
# SHA-256 of the decompressed files; the same lines as dataset/MNIST/raw/SHA256SUMS (a test checks).
SHA256 = {"t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
          "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
          "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
          "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"}
UBYTE = 0x08
NUM_CLASSES = 10  # digits 0-9
IMAGE_SHAPE = (1, 28, 28)  # channels, height, width
BINARIZE_SEED = 0  # the binarized test set is the same for every run, checkpoint and script


def mnist_mismatch(image_channels: int, image_size: int, num_classes: int) -> str | None:
    """Why a model of this shape cannot be fed MNIST, or None if it can."""
    if (image_channels, image_size, image_size) != IMAGE_SHAPE:
        return (f"it is for {image_channels}-channel {image_size}x{image_size} images, "
                f"MNIST's are {IMAGE_SHAPE[0]}-channel {IMAGE_SHAPE[1]}x{IMAGE_SHAPE[2]}")
    if num_classes not in (0, NUM_CLASSES):
        return f"it is conditioned on {num_classes} classes, MNIST has {NUM_CLASSES}"
    return None


def raw_dir(data_dir) -> str:
    return os.path.join(os.fspath(data_dir), "MNIST", "raw")


def parse_idx(data, source: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Decode IDX bytes (unsigned-byte type) into a uint8 tensor, checking the header, the dimensions (`shape`, when
    given) and the length first; UserError naming `source`. A bytearray is used in place, anything else copied once."""
    if len(data) < 4:
        raise UserError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != UBYTE or not 1 <= ndim <= 4:
        raise UserError(f"{source}: bad IDX magic number 0x{bytes(data[:4]).hex()} "
                        "(expected 0x000008NN, unsigned bytes)")
    if shape is not None and ndim != len(shape):
        raise UserError(f"{source}: has {ndim} dimensions, expected {len(shape)}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{source}: truncated IDX header")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if shape is not None and dims != tuple(shape):
        raise UserError(f"{source}: dimensions {dims}, expected {tuple(shape)}")
    count = math.prod(dims)
    if len(data) - header != count:
        what = "truncated" if len(data) - header < count else "has trailing bytes"
        raise UserError(f"{source}: {what}: {len(data) - header} data bytes, header says {count}")
    if count == 0:
        return torch.empty(dims, dtype=torch.uint8)
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=torch.uint8, offset=header).reshape(dims)


def read_file(raw: str, name: str) -> bytearray | None:
    """The verified content of `raw/name` (structure, then the SHA-256 of SHA256SUMS), decompressing `name.gz` beside
    it if needed (written atomically where the folder allows); None if neither exists (UserError if neither is a file
    but one of the names is taken). Reads at most one byte more than the file should have, so a gzip bomb cannot
    fill memory. Never deletes or overwrites anything but its own temp files."""
    plain, limit = os.path.join(raw, name), 4 + 4 * len(FILES[name]) + math.prod(FILES[name])
    source = plain if os.path.isfile(plain) else plain + ".gz"
    if not os.path.isfile(source):
        odd = [p for p in (plain, plain + ".gz") if os.path.lexists(p)]  # not missing: never download over it
        if odd:
            raise UserError(f"{odd[0]}: not a regular file (a folder, a pipe or a device, or a link to one, to "
                            "nowhere or in a loop); remove it or put MNIST's file there")
        return None
    try:
        with (open(source, "rb") if source == plain else gzip.open(source, "rb")) as f:
            data = bytearray(f.read(limit + 1))
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; EOFError: truncated
        if source == plain:
            raise UserError(f"{source}: cannot read ({e.strerror or e})") from None
        raise UserError(f"{source}: not a valid gzip file ({e or type(e).__name__})") from None
    hint = f"; delete it to re-extract it from {name}.gz" if source == plain else ""
    if len(data) > limit:
        raise UserError(f"{source}: decompresses to more than the expected {limit} bytes{hint}")
    try:
        parse_idx(data, source, FILES[name])
        digest = hashlib.sha256(data).hexdigest()
        if digest != SHA256[name]:
            raise UserError(f"{source}: SHA-256 {digest[:12]}... is not MNIST's ({SHA256[name][:12]}...): a damaged "
                            "copy, or other data (the scripts take MNIST only)")
    except UserError as e:
        raise UserError(f"{e}{hint}") from None
    if source != plain and not os.path.lexists(plain):  # a cache of the checked bytes, never over anything
        files.remove_stale_temp_files(plain)  # what a killed decompression left
        try:
            files.write_atomic(plain, lambda f: f.write(data))
        except UserError:  # a read-only folder: the .gz is decompressed again next time
            pass
    return data


def _download(data_dir: str) -> None:
    """torchvision's own download (needs internet); separate so tests can replace it."""
    import torchvision
    torchvision.datasets.MNIST(data_dir, train=True, download=True)


def _read_or_download(data_dir: str, names) -> list[bytearray]:
    raw = raw_dir(data_dir)
    if not os.path.isdir(data_dir):
        why = "not a folder" if os.path.exists(data_dir) else "no such data folder"
        raise UserError(f"{data_dir or repr(data_dir)}: {why}; pass --data-dir pointing at a folder that "
                        "holds MNIST/raw/ (the project ships one in dataset/)")
    found = [read_file(raw, name) for name in names]
    missing = [name + ".gz" for name, got in zip(names, found) if got is None]
    if missing:
        new = [f for f in (raw, os.path.dirname(raw)) if not os.path.exists(f)]  # deepest first
        try:
            _download(data_dir)
            found = [read_file(raw, name) for name in names]
            if None in found:
                raise OSError("the files are still missing after the download")
        except BaseException as e:  # any failure of the fallback becomes the one-line message below
            for folder in new:  # what a failed download made, if empty
                if os.path.isdir(folder) and not os.listdir(folder):
                    os.rmdir(folder)
            if not isinstance(e, Exception):
                raise
            raise UserError(f"{raw}: MNIST file(s) missing ({', '.join(missing)}) and the download failed "
                            f"({first_line(e)}); copy the four MNIST .gz files there or pass --data-dir "
                            "pointing at a folder that holds MNIST/raw/") from None
    return found


def ensure_mnist(data_dir=DEFAULT_DATA_DIR) -> str:
    """Verify (and decompress) all four files, downloading them if absent; returns the raw folder, where
    torchvision.datasets.MNIST(data_dir) then finds everything it needs."""
    _read_or_download(os.fspath(data_dir), list(FILES))
    return raw_dir(data_dir)


def load_split(split: str, data_dir=DEFAULT_DATA_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) on the CPU, for split 'train' or 'test': the same tensors as
    torchvision.datasets.MNIST(data_dir).data (with a channel dim) and .targets (a test checks), decoded from the
    verified bytes without a copy (torchvision would parse every file again)."""
    assert split in ("train", "test"), split
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    images, labels = _read_or_download(os.fspath(data_dir), names)
    raw = raw_dir(data_dir)
    return (parse_idx(images, os.path.join(raw, names[0]), FILES[names[0]]).unsqueeze(1),
            parse_idx(labels, os.path.join(raw, names[1]), FILES[names[1]]).long())


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels 0..255 -> float in [0, 1]; float images pass through unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


@dataclass
class TensorDataset:
    """A split resident on one device, as uint8 (4x smaller than float; converted per batch)."""

    images: torch.Tensor  # [N, 1, 28, 28] uint8
    labels: torch.Tensor  # [N] int64, digits 0-9

    @classmethod
    def load(cls, split: str, data_dir=DEFAULT_DATA_DIR, device="cpu", limit: int | None = None):
        images, labels = load_split(split, data_dir)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return cls(images.to(device), labels.to(device))

    def binarized(self, seed: int) -> "TensorDataset":
        """A copy with each pixel drawn once as Bernoulli(grey level), stored as 0 or 255, drawn on the
        CPU so that every device gets the same images."""
        g = torch.Generator().manual_seed(seed)
        bits = torch.bernoulli(self.images.cpu().float().div_(255), generator=g)
        return TensorDataset(bits.mul_(255).to(torch.uint8).to(self.images.device), self.labels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def gather(self, idx, labels: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored uint8 images and (if asked for) the labels at `idx` (a slice or index tensor)."""
        if isinstance(idx, slice):
            return self.images[idx], self.labels[idx] if labels else None
        # index_select: a faster gather of uint8 rows on the CPU than images[idx] (benchmarks/)
        return self.images.index_select(0, idx), self.labels.index_select(0, idx) if labels else None

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for the indices `idx` (a slice or index tensor)."""
        x, y = self.gather(idx)
        return to_unit(x), y

    def batches(self, batch_size: int):
        """Yield (x, labels) over the split in order (evaluation; training indexes a permutation)."""
        for i in range(0, len(self), batch_size):
            yield self.batch(slice(i, i + batch_size))


def fitting_set(train_set: TensorDataset, binarize: bool) -> TensorDataset:
    """The training images a latent mixture is fitted to, as the model was trained on them: for a
    binarized model one draw of them (with its own seed, not the test set's)."""
    return train_set.binarized(BINARIZE_SEED + 1) if binarize else train_set


def load_test_set(data_dir=DEFAULT_DATA_DIR, device="cpu", limit: int | None = None,
                  binarize: bool = False) -> TensorDataset:
    """The test split as every script evaluates it. For binarized runs, each pixel is drawn once as Bernoulli(grey
    level) with BINARIZE_SEED (TensorDataset.binarized)."""
    test = TensorDataset.load("test", data_dir, device, limit)
    return test.binarized(BINARIZE_SEED) if binarize else test
