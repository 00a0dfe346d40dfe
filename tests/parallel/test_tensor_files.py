"""Per-tensor checksums in the safetensors files we write: computed while streaming, stored in
the header, verified the first time any part of a tensor is read. The references are the file's
own bytes hashed here with zlib and Hugging Face's `safetensors` package as an independent reader."""
import json
import struct
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from parallel.tensor_files import StreamingSafetensorsWriter, TensorFile, TensorFileError
from tests.damage import flip_byte, tensor_span

pytestmark = pytest.mark.timeout(30)

TENSORS = {"a": torch.randn(6, 5, generator=torch.Generator().manual_seed(0)),
           "b": torch.arange(12, dtype=torch.int64).reshape(3, 4),
           "c": torch.linspace(-1, 1, 12).to(torch.bfloat16).reshape(4, 3),
           "empty": torch.zeros(0, 3)}


def _writer(path, tensors=TENSORS, metadata=None):
    return StreamingSafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], metadata)


def _write(path, tensors=TENSORS, metadata=None):
    w = _writer(path, tensors, metadata)
    for n, t in tensors.items():
        w.write(n, t)
    w.close()


def _saved_sums(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(json.loads(raw[8:8 + n])["__metadata__"]["crc32"])


def test_each_tensor_s_checksum_is_the_crc32_of_its_bytes_on_disk(tmp_path):
    path = tmp_path / "t.safetensors"
    _write(path, metadata={"format": "pt"})
    raw = path.read_bytes()
    on_disk = {n: f"{zlib.crc32(raw[slice(*tensor_span(path, n))]):08x}" for n in TENSORS}
    assert _saved_sums(path) == on_disk
    theirs = load_file(path)  # another reader sees plain safetensors, tensors and metadata intact
    assert all(torch.equal(theirs[n], t) for n, t in TENSORS.items())
    tf = TensorFile(path)
    assert tf.has_checksums and tf.metadata() == {"format": "pt"}
    assert all(torch.equal(tf.get(n), t) for n, t in TENSORS.items())


def test_a_flipped_byte_fails_get_and_get_rows_naming_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    _write(path)
    saved = _saved_sums(path)["a"]
    flip_byte(path, "a", fraction=0.9)  # in row 5: rows 0-1 themselves are intact
    read = f"{zlib.crc32(path.read_bytes()[slice(*tensor_span(path, 'a'))]):08x}"
    want = (rf"tensor file '{path}': tensor 'a' fails its checksum \(saved crc32 {saved}, read {read}\): "
            "the file is damaged")
    with pytest.raises(TensorFileError, match=want):
        TensorFile(path).get("a")
    with pytest.raises(TensorFileError, match=want):
        TensorFile(path).get_rows("a", 0, 0, 2)
    with pytest.raises(TensorFileError, match=want):
        TensorFile(path).get_rows("a", 1, 0, 2)
    tf = TensorFile(path)
    assert torch.equal(tf.get("b"), TENSORS["b"]) and torch.equal(tf.get("c"), TENSORS["c"])  # the rest reads
    unverified = TensorFile(path, verify=False)  # a rank that leaves verifying to another
    assert torch.equal(unverified.get_rows("a", 0, 0, 2), TENSORS["a"][:2])
    with pytest.raises(TensorFileError, match=want):
        unverified.verify("a")


def test_files_without_checksums_load_unverified(tmp_path):
    path = tmp_path / "hf.safetensors"
    save_file({"a": TENSORS["a"]}, path, metadata={"format": "pt"})  # as Hugging Face writes them
    flip_byte(path, "a")
    tf = TensorFile(path)
    assert not tf.has_checksums
    got = tf.get("a")
    assert (got != TENSORS["a"]).sum() == 1  # damaged, and nothing could tell


def test_a_file_whose_writer_never_closed_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    w = _writer(path)
    for n, t in TENSORS.items():
        w.write(n, t)
    w.file.flush()  # every byte of data is there; the sums are still placeholders
    with pytest.raises(TensorFileError, match=rf"'{path}' was never finished"):
        TensorFile(path)


def test_a_full_disk_is_an_error_naming_the_file():
    with pytest.raises(TensorFileError, match=r"cannot write tensor file '/dev/full': No space left on device"):
        _write("/dev/full", {"big": torch.zeros(1 << 18)})  # 1 MiB: more than the write buffer holds
