"""A reader for LeCun's IDX format, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number, the sizes of its dimensions, then the elements::

    0x00 0x00 <type code> <number of dimensions>
    <size of dimension 0, big-endian uint32> ... <size of dimension n-1>
    <elements, big-endian, row-major>

``read_idx`` reads plain and gzip-compressed files and returns a tensor. It trusts nothing the
header claims: the byte count a header announces is checked against what the file really holds
before anything of that size is allocated, so a corrupt or hostile file fails fast and cheaply.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Union

import torch

__all__ = ["IDX_DTYPES", "IDXFormatError", "read_idx"]

#: Type codes of the IDX format and the tensor dtypes they become.
IDX_DTYPES: dict[int, torch.dtype] = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}

_GZIP_MAGIC = b"\x1f\x8b"
_MAGIC_LENGTH = 4
_DIMENSION_LENGTH = 4  # each size is a big-endian uint32

# A compressed stream's length is unknown until it has been read, so it is read in chunks of this
# size: a header that lies costs at most the bytes really present plus one chunk.
_CHUNK_BYTES = 1 << 20

# Beyond this a tensor could not be indexed (torch counts elements in int64).
_MAX_BYTES = 2**63 - 1


class IDXFormatError(ValueError):
    """A file is not valid IDX: the message names the file and says what is wrong with it."""

    def __init__(self, path: Union[str, os.PathLike], problem: str) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from its arguments, so it survives pickling (multiprocessing, DDP spawn)
        return type(self), (self.path, self.problem)


def read_idx(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Read an IDX file, plain or gzip-compressed, into a tensor.

    Compression is recognised by the file's first two bytes rather than by its name: gzip's
    ``1f 8b`` can never begin an IDX file (whose first two bytes are zero), so a ``.gz`` file
    that a server already decompressed, or a compressed file without the suffix, still reads.

    Args:
        path: the file.

    Returns:
        A tensor of the file's element type (``torch.uint8`` for MNIST's images and labels),
        in native byte order, whose shape is the dimensions the header lists.

    Raises:
        IDXFormatError: the file is not valid IDX: a wrong magic number, an unknown type code,
            a truncated header, fewer data bytes than the header claims, bytes after the data,
            a size too large to address, or a corrupt gzip stream.
        FileNotFoundError: ``path`` does not exist.

    Example::

        images = read_idx("data/MNIST/raw/train-images-idx3-ubyte.gz")  # uint8, (60000, 28, 28)
    """
    path = Path(os.fspath(path))
    with open(path, "rb") as file:
        compressed = file.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
        file.seek(0)
        if not compressed:
            return _read_idx_stream(file, path, file_size=os.fstat(file.fileno()).st_size)
        with _gzip_errors_as_format_errors(path), gzip.GzipFile(fileobj=file, mode="rb") as stream:
            return _read_idx_stream(stream, path, file_size=None)


def _read_idx_stream(stream: BinaryIO, path: Path, *, file_size: Optional[int]) -> torch.Tensor:
    """The tensor in ``stream``; ``file_size`` is known for plain files and ``None`` for gzip."""
    dtype, shape, header_bytes = _read_header(stream, path)
    data_bytes = _claimed_data_bytes(shape, dtype, path)
    claim = _describe(shape, dtype)
    if file_size is not None:
        _check_file_size(file_size, header_bytes, claim, data_bytes, path)
        data = _read_known_size(stream, data_bytes, path)
    else:
        data = _read_in_chunks(stream, claim, data_bytes, path)
    if stream.read(1):
        raise IDXFormatError(path, f"trailing bytes after the data of the {claim} the header claims")
    return _tensor_from_big_endian(data, dtype, shape)


def _read_header(stream: BinaryIO, path: Path) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The element type, the shape, and the header's length in bytes."""
    magic = stream.read(_MAGIC_LENGTH)
    if len(magic) < _MAGIC_LENGTH:
        raise IDXFormatError(
            path, f"truncated header: the file holds {len(magic)} bytes, an IDX header needs at least {_MAGIC_LENGTH}"
        )
    if magic[0] != 0 or magic[1] != 0:
        found = f"0x{magic[0]:02x} 0x{magic[1]:02x}"
        raise IDXFormatError(path, f"not an IDX file: the first two bytes must be 0x00 0x00, got {found}")
    type_code, dimensions = magic[2], magic[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        raise IDXFormatError(path, f"unknown element type code 0x{type_code:02x} (known: {known})")
    sizes_length = dimensions * _DIMENSION_LENGTH
    sizes = stream.read(sizes_length)
    if len(sizes) < sizes_length:
        raise IDXFormatError(
            path,
            f"truncated header: it declares {dimensions} dimensions ({_MAGIC_LENGTH + sizes_length} header bytes) "
            f"but the file ends after {_MAGIC_LENGTH + len(sizes)} bytes",
        )
    shape = struct.unpack(f">{dimensions}I", sizes)
    return IDX_DTYPES[type_code], shape, _MAGIC_LENGTH + sizes_length


def _claimed_data_bytes(shape: tuple[int, ...], dtype: torch.dtype, path: Path) -> int:
    # Zero sizes are left out of the bound: a 0x(2**32-1)x(2**32-1) array holds nothing, yet its
    # strides would overflow, so torch could not even create it empty.
    span = math.prod(size for size in shape if size) * dtype.itemsize
    if span > _MAX_BYTES:
        raise IDXFormatError(path, f"the header claims a {_describe(shape, dtype)}, more than can be addressed")
    return math.prod(shape) * dtype.itemsize


def _check_file_size(file_size: int, header_bytes: int, claim: str, data_bytes: int, path: Path) -> None:
    """Compare the size the header implies with the real one before reading (or allocating) anything."""
    expected = header_bytes + data_bytes
    if file_size < expected:
        raise IDXFormatError(
            path,
            f"truncated data: the header claims a {claim} ({data_bytes} bytes), "
            f"but the file holds only {file_size - header_bytes} bytes after its {header_bytes}-byte header",
        )
    if file_size > expected:
        raise IDXFormatError(
            path,
            f"{file_size - expected} trailing bytes after the data: the header claims a {claim} "
            f"({expected} bytes with the header), the file holds {file_size} bytes",
        )


def _read_known_size(stream: BinaryIO, data_bytes: int, path: Path) -> bytearray:
    """Read ``data_bytes`` that the file size has already shown to be present, in one allocation."""
    data = bytearray(data_bytes)
    view = memoryview(data)
    filled = 0
    while filled < data_bytes:
        count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:  # the file shrank after it was measured
            raise IDXFormatError(path, f"truncated data: the file ended after {filled} of {data_bytes} data bytes")
        filled += count
    return data


def _read_in_chunks(stream: BinaryIO, claim: str, data_bytes: int, path: Path) -> bytearray:
    """Read ``data_bytes`` from a stream of unknown length, never holding more than was really read plus a chunk."""
    data = bytearray()
    while len(data) < data_bytes:
        chunk = stream.read(min(_CHUNK_BYTES, data_bytes - len(data)))
        if not chunk:
            raise IDXFormatError(
                path,
                f"truncated data: the header claims a {claim} ({data_bytes} bytes), "
                f"but the decompressed stream ends after {len(data)} data bytes",
            )
        data += chunk
    return data


def _tensor_from_big_endian(data: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The elements of ``data`` (big-endian) as a native-order tensor, without a per-element Python loop."""
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(data, dtype=torch.uint8)  # shares memory with ``data``
    if dtype.itemsize > 1 and sys.byteorder == "little":
        raw = raw.view(-1, dtype.itemsize).flip(1).contiguous()  # reverse the bytes of each element
    return raw.view(dtype).reshape(shape)


@contextmanager
def _gzip_errors_as_format_errors(path: Path) -> Iterator[None]:
    """A corrupt gzip stream is a malformed file, reported like every other format problem."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise IDXFormatError(path, f"corrupt gzip stream: {error}") from error


def _describe(shape: tuple[int, ...], dtype: torch.dtype) -> str:
    """``"60000x28x28 uint8 array"``."""
    dimensions = "x".join(map(str, shape)) if shape else "0-dimensional"
    return f"{dimensions} {str(dtype).removeprefix('torch.')} array"
