import gzip
import hashlib
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lib import data
from lib.checks import UserError
from lib.data import parse_idx, read_file

RAW = data.raw_dir(data.DEFAULT_DATA_DIR)
LABELS = "t10k-labels-idx1-ubyte"  # the smallest file: 10,008 bytes decompressed


def test_sha256sums_file_matches_the_code():
    with open(os.path.join(RAW, "SHA256SUMS")) as f:
        listed = dict(reversed(line.split()) for line in f if line.strip())
    assert listed == data.SHA256


def test_splits_load_as_uint8_tensors():
    images, labels = data.load_split("test")
    assert images.shape == (10000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels[:5].tolist() == [7, 2, 1, 0, 4]
    ds = data.TensorDataset.load("train", limit=100)
    x, y = ds.batch(torch.tensor([3, 1]))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape == (2, 1, 28, 28)
    assert y.tolist() == ds.labels[[3, 1]].tolist()
    assert torch.equal(x, ds.images[[3, 1]].float() / 255)
    xs, ys = ds.batch(slice(1, 4))
    assert torch.equal(xs[2], x[0]) and ys.tolist() == ds.labels[1:4].tolist()
    # What training passes on: the stored uint8 rows, labels only when asked for.
    raw, none = ds.gather(torch.tensor([3, 1]), labels=False)
    assert raw.dtype == torch.uint8 and none is None and torch.equal(data.to_unit(raw), x)
    assert data.to_unit(x) is x


def _idx(dims, payload=None, magic=b"\x00\x00\x08"):
    n = 1
    for d in dims:
        n *= d
    head = magic + bytes([len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + (bytes(n) if payload is None else payload)


def test_parse_idx_checks_structure():
    assert parse_idx(_idx((2, 3)), "f", (2, 3)).shape == (2, 3)
    cases = {
        "magic": _idx((2, 3), magic=b"\x00\x00\x0d"),
        "dimensions": _idx((6,)),
        "truncated": _idx((2, 3))[:-1],
        "trailing": _idx((2, 3)) + b"\x00",
        "too short": b"\x00\x00",
    }
    for what, raw in cases.items():
        with pytest.raises(UserError, match="^f: ") as e:
            parse_idx(raw, "f", (2, 3))
        assert what.split()[0] in str(e.value) or what == "dimensions"
    with pytest.raises(UserError, match=r"dimensions \(3, 2\)"):
        parse_idx(_idx((3, 2)), "f", (2, 3))


def _copy_raw(tmp_path, names=(LABELS,)):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in names:
        shutil.copy(os.path.join(RAW, name + ".gz"), raw)
    return raw


def test_good_gz_is_verified_and_decompressed(tmp_path):
    raw = _copy_raw(tmp_path)
    assert read_file(str(raw), LABELS)
    with open(raw / LABELS, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == data.SHA256[LABELS]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "not a valid gzip"),                      # truncated download
    (lambda b: b"not gzip at all" + b, "not a valid gzip"),
    (lambda b: gzip.compress(gzip.decompress(b)[:-5]), "truncated"),       # short content
    (lambda b: gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(b)[4:]), "dimensions"),
    (lambda b: gzip.compress(b"\x00\x00\x0b\x01" + gzip.decompress(b)[4:]), "magic"),
    (lambda b: gzip.compress(gzip.decompress(b)[:-1] + b"\x09"), "SHA-256"),  # one wrong label
])
def test_corrupt_gz_is_named_and_kept(tmp_path, damage, message):
    raw = _copy_raw(tmp_path)
    gz = raw / (LABELS + ".gz")
    gz.write_bytes(damage(gz.read_bytes()))
    before = gz.read_bytes()
    with pytest.raises(UserError, match=message) as e:
        read_file(str(raw), LABELS)
    assert str(e.value).startswith(str(gz)) and "\n" not in str(e.value)
    assert gz.read_bytes() == before and not (raw / LABELS).exists()  # nothing written or deleted


def test_corrupt_decompressed_file_is_reported_not_overwritten(tmp_path):
    raw = _copy_raw(tmp_path)
    (raw / LABELS).write_bytes(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + bytes(10000))
    with pytest.raises(UserError, match="SHA-256.*delete it") as e:
        read_file(str(raw), LABELS)
    assert str(raw / LABELS) in str(e.value)
    assert (raw / LABELS).read_bytes()[8:] == bytes(10000)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.symlink_to(p.name),  # a folder; a loop
                                  lambda p: p.symlink_to("nowhere"), os.mkfifo])
def test_a_name_taken_by_no_file_is_named_not_downloaded_over(tmp_path, monkeypatch, make, suffix):
    monkeypatch.setattr(data, "_download", lambda _: pytest.fail("downloaded"))
    raw = _copy_raw(tmp_path, names=())  # the other three missing: a download, were the taken name missing too
    make(raw / (LABELS + suffix))
    with pytest.raises(UserError, match="not a regular file") as e:
        data.ensure_mnist(tmp_path)  # all four files, as the scripts read them
    assert str(e.value).startswith(str(raw / (LABELS + suffix))) and "\n" not in str(e.value)


def test_missing_files_and_failed_download_give_one_line(tmp_path, monkeypatch):
    def offline(_):  # torchvision's message: what, then per mirror "Tried URL, got:" and the error on its own line
        raise RuntimeError("Error downloading x.gz:\nTried https://a/, got:\nno network\nTried https://b/, got:\nno\n")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(UserError, match="missing.*download failed.*Tried https://a/, got: no network.*--data-dir") as e:
        data.load_split("test", tmp_path)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                derandomize=True, database=None)  # the same examples on every run and machine


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_parse_idx_random_bytes(blob):
    try:
        t = parse_idx(blob, "fuzz", None)
        assert t.dtype == torch.uint8
    except UserError as e:
        assert str(e).startswith("fuzz: ")


REAL_GZ = open(os.path.join(RAW, LABELS + ".gz"), "rb").read()


@FUZZ
@given(st.one_of(
    st.binary(max_size=3000),
    st.lists(st.tuples(st.integers(0, len(REAL_GZ) - 1), st.integers(0, 255)), min_size=1, max_size=8)
      .map(lambda edits: _mutate(REAL_GZ, edits)),
    st.integers(0, len(REAL_GZ) - 1).map(lambda n: REAL_GZ[:n]),
))
def test_fuzz_gzip_and_idx_reading_path(blob):
    import tempfile

    with tempfile.TemporaryDirectory() as raw:
        with open(os.path.join(raw, LABELS + ".gz"), "wb") as f:
            f.write(blob)
        try:
            assert read_file(raw, LABELS)
            # Only the true content may pass: then it matched the checksum.
            with open(os.path.join(raw, LABELS), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == data.SHA256[LABELS]
        except UserError as e:
            assert str(e).startswith(os.path.join(raw, LABELS)) and "\n" not in str(e)


def _mutate(blob, edits):
    b = bytearray(blob)
    for pos, val in edits:
        b[pos] = val
    return bytes(b)


def test_decoding_matches_torchvision():
    import torchvision

    data.ensure_mnist()  # all four files decompressed, which torchvision needs whatever the split
    for split in ("train", "test"):
        images, labels = data.load_split(split)
        ref = torchvision.datasets.MNIST(data.DEFAULT_DATA_DIR, train=split == "train")
        assert torch.equal(images.squeeze(1), ref.data) and torch.equal(labels, ref.targets)


def test_binarized_test_set_is_fixed_and_binary():
    test = data.TensorDataset.load("test", limit=100)
    a, b = data.load_test_set(limit=100, binarize=True), data.load_test_set(limit=100, binarize=True)
    assert torch.equal(a.images, b.images)
    assert set(a.images.unique().tolist()) <= {0, 255}
    # Pixel means match grey levels on average (Bernoulli(grey) draws).
    assert abs(a.images.float().mean() - test.images.float().mean()) < 2.0

