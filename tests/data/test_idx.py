"""The IDX reader: exact values for every element type, and a clear IDXFormatError for every malformed file."""

from __future__ import annotations

import gzip
import pickle
import re
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neurenix.data.idx import IDXFormatError, read_idx

# The encoding is written here from the format's description, independently of the reader.
TYPE_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_header(type_code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` in IDX: header, then big-endian elements."""
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return idx_header(TYPE_CODES[array.dtype], array.shape) + big_endian.tobytes()


def write_file(path: Path, content: bytes) -> Path:
    """Write ``content``, gzip-compressed when ``path`` ends in ``.gz``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if path.suffix == ".gz" else content)
    return path


def write_idx(path: Path, array: np.ndarray) -> Path:
    return write_file(path, idx_bytes(array))


def sample_array(dtype: np.dtype, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Values that span the type, extremes included (and inf, nan, -0.0 for floats)."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
        extremes = [info.min, info.max]
    else:
        values = (rng.standard_normal(size=shape) * 1e3).astype(dtype)
        extremes = [np.inf, -np.inf, np.nan, -0.0]
    flat = values.reshape(-1)
    flat[: len(extremes)] = extremes[: flat.size]
    return values


@pytest.mark.parametrize("dtype", list(TYPE_CODES), ids=str)
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)], ids=str)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_files_read_back_equal(tmp_path: Path, dtype: np.dtype, shape: tuple[int, ...], suffix: str) -> None:
    array = sample_array(dtype, shape)
    tensor = read_idx(write_idx(tmp_path / f"file{suffix}", array))
    expected = torch.from_numpy(array)
    assert tensor.dtype == expected.dtype
    assert tensor.shape == expected.shape
    assert torch.equal(tensor.view(torch.uint8), expected.view(torch.uint8))  # bit for bit: nan, -0.0


def test_big_endian_values_become_native(tmp_path: Path) -> None:
    int32 = idx_header(0x0C, (2,)) + bytes([0x01, 0x02, 0x03, 0x04, 0xFF, 0xFF, 0xFF, 0xFE])
    float64 = idx_header(0x0E, (1,)) + bytes([0x3F, 0xF8, 0, 0, 0, 0, 0, 0])
    assert read_idx(write_file(tmp_path / "i", int32)).tolist() == [0x01020304, -2]
    assert read_idx(write_file(tmp_path / "f", float64)).tolist() == [1.5]


def test_empty_and_zero_dimensional_arrays(tmp_path: Path) -> None:
    empty = read_idx(write_idx(tmp_path / "empty.gz", np.zeros((0, 28, 28), np.uint8)))
    assert empty.shape == (0, 28, 28) and empty.dtype == torch.uint8
    scalar = read_idx(write_file(tmp_path / "scalar", idx_header(0x0B, ()) + b"\x80\x01"))
    assert scalar.shape == () and scalar.item() == -32767


def test_compression_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    compressed_without_suffix = write_file(tmp_path / "a", gzip.compress(idx_bytes(array)))
    plain_with_suffix = tmp_path / "b.gz"
    plain_with_suffix.write_bytes(idx_bytes(array))  # as when a server already decompressed it
    for path in (compressed_without_suffix, plain_with_suffix):
        assert torch.equal(read_idx(path), torch.from_numpy(array))


VALID = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))

MALFORMED = {
    "wrong magic": (b"\x01\x00" + VALID[2:], "first two bytes must be 0x00 0x00, got 0x01 0x00"),
    "unknown type": (VALID[:2] + b"\x0a" + VALID[3:], "unknown element type code 0x0a"),
    "short magic": (VALID[:3], "truncated header: the file holds 3 bytes"),
    "short dimensions": (VALID[:10], "declares 3 dimensions (16 header bytes) but the file ends after 10"),
    "truncated data": (VALID[:-1], "truncated data: the header claims a 2x3x4 int16 array (48 bytes)"),
    "trailing garbage": (VALID + b"\x00", "trailing bytes"),
}


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_files_raise_a_clear_error(tmp_path: Path, case: str, suffix: str) -> None:
    content, message = MALFORMED[case]
    path = write_file(tmp_path / f"bad{suffix}", content)
    with pytest.raises(IDXFormatError, match=re.escape(message)) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_corrupt_gzip_stream_raises_a_format_error(tmp_path: Path) -> None:
    compressed = gzip.compress(VALID)
    truncated = write_file(tmp_path / "truncated", compressed[:-12])
    with pytest.raises(IDXFormatError, match="corrupt gzip stream"):
        read_idx(truncated)
    bad_crc = write_file(tmp_path / "crc", compressed[:-8] + bytes(4) + compressed[-4:])
    with pytest.raises(IDXFormatError, match="corrupt gzip stream"):
        read_idx(bad_crc)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_a_lying_header_fails_fast_without_allocating_what_it_claims(tmp_path: Path, suffix: str) -> None:
    claims_2_gib = idx_header(0x08, (2**31,)) + bytes(range(100))
    path = write_file(tmp_path / f"liar{suffix}", claims_2_gib)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(IDXFormatError, match="truncated data: the header claims a 2147483648 uint8 array"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 8 * 2**20  # at most one read chunk (1 MiB) plus bookkeeping, never 2 GiB


@pytest.mark.parametrize("shape", [(2**32 - 1,) * 4, (0, 2**32 - 1, 2**32 - 1)], ids=["huge", "empty but huge strides"])
def test_sizes_beyond_what_can_be_addressed_are_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    path = write_file(tmp_path / "huge.gz", idx_header(0x0E, shape))
    with pytest.raises(IDXFormatError, match="more than can be addressed"):
        read_idx(path)


def test_the_error_survives_pickling() -> None:  # as it must to cross process boundaries
    error = pickle.loads(pickle.dumps(IDXFormatError("/data/x", "trailing bytes")))
    assert (error.path, error.problem, str(error)) == ("/data/x", "trailing bytes", "/data/x: trailing bytes")


def test_missing_file_is_a_file_not_found_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


# Fuzzing: a valid file, then a truncation, overwritten bytes or appended bytes, before or after
# compression. Whatever the damage, the reader returns a tensor or raises IDXFormatError.

@st.composite
def damaged_files(draw: st.DrawFn) -> tuple[bytes, bool, bool]:
    dtype = draw(st.sampled_from(list(TYPE_CODES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    content = idx_bytes(sample_array(dtype, shape, seed=draw(st.integers(0, 3))))
    compress_first = draw(st.booleans())
    compressed = draw(st.booleans())
    if compressed and compress_first:
        content = gzip.compress(content)
    content = draw(st.one_of(_truncations(content), _overwrites(content), _appends(content)))
    if compressed and not compress_first:
        content = gzip.compress(content)
    return content, compressed, compress_first


def _truncations(content: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, len(content)).map(lambda end: content[:end])


def _overwrites(content: bytes) -> st.SearchStrategy[bytes]:
    edits = st.lists(st.tuples(st.integers(0, max(len(content) - 1, 0)), st.integers(0, 255)), min_size=1, max_size=4)
    return edits.map(lambda changes: _overwrite(content, changes))


def _overwrite(content: bytes, changes: list[tuple[int, int]]) -> bytes:
    edited = bytearray(content)
    for position, value in changes:
        if position < len(edited):
            edited[position] = value
    return bytes(edited)


def _appends(content: bytes) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=1, max_size=16).map(lambda extra: content + extra)


@settings(max_examples=300, deadline=None)
@given(damaged=damaged_files())
def test_damaged_files_give_a_tensor_or_a_format_error(
    tmp_path_factory: pytest.TempPathFactory, damaged: tuple[bytes, bool, bool]
) -> None:
    content, compressed, compress_first = damaged
    path = tmp_path_factory.mktemp("fuzz") / "file"
    path.write_bytes(content)
    try:
        tensor = read_idx(path)
    except IDXFormatError:
        return
    if not compressed or not compress_first:  # the IDX bytes are known: the tensor must encode back to them
        idx = gzip.decompress(content) if compressed else content
        header_length = 4 + 4 * idx[3]
        # numpy refuses some empty shapes (0 x 2**31 x ...), so those are encoded from a flat empty array
        values = tensor.numpy() if tensor.numel() else torch.empty(0, dtype=tensor.dtype).numpy()
        encoded = values.astype(values.dtype.newbyteorder(">")).tobytes()
        assert idx[:header_length] + encoded == idx
