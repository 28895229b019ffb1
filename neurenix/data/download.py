"""Verified, atomic downloads from a list of mirrors.

A file is streamed into a temporary file beside its destination, its MD5 is checked, and only then
is it renamed onto the destination (``os.replace``, atomic on POSIX and Windows). So the
destination either does not exist or holds verified bytes; a crash, a dropped connection or a
corrupt mirror never leaves a partial file under the final name. Several processes downloading
the same file at once each write their own temporary file, and the last verified one wins.
A download that fails removes the folders it created for the file, when they are still empty,
and only those: a failed first download leaves no empty ``data/MNIST/raw/`` behind.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import secrets
import string
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Optional, Union

__all__ = ["DownloadError", "download_file", "file_md5"]

log = logging.getLogger(__name__)

_DEFAULT_TIMEOUT = 30.0  # seconds without progress, not for the whole file: the largest MNIST file is ~10 MB
_CHUNK_BYTES = 1 << 20
_USER_AGENT = "neurenix"  # some mirrors refuse urllib's default agent (Python-urllib/3.x)
_MD5_LENGTH = 32


class _ChecksumMismatch(ValueError):
    """Downloaded bytes whose MD5 is not the one expected (one mirror's failure, never raised to callers)."""


class DownloadError(RuntimeError):
    """Every mirror failed. ``failures`` lists ``(url, reason)`` in the order they were tried;
    ``note`` is what the message adds after them (what was left as it was, what to do)."""

    def __init__(self, path: Path, failures: list[tuple[str, str]], note: str = "") -> None:
        self.path = path
        self.failures = failures
        self.note = note
        lines = [f"could not download {path.name} to {path}: every mirror failed"]
        lines += [f"  {url}: {reason}" for url, reason in failures]
        if note:
            lines.append(note)
        super().__init__("\n".join(lines))
        self._arguments = (path, failures, note)

    def __reduce__(self):  # rebuilt from its arguments, so it survives pickling (multiprocessing, DDP spawn)
        return type(self), self._arguments


def file_md5(path: Union[str, os.PathLike]) -> str:
    """The MD5 of a file as 32 lowercase hex digits, read in chunks."""
    digest = _new_md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(
    urls: Sequence[str],
    path: Union[str, os.PathLike],
    md5: str,
    *,
    timeout: float = _DEFAULT_TIMEOUT,
) -> Path:
    """Make ``path`` hold the verified file, downloading it from the first mirror that serves it.

    A file already at ``path`` whose MD5 matches is kept and nothing is fetched. A file whose MD5
    does not match is not trusted: it is replaced by a verified download, and left untouched
    (with an error) when no mirror can provide one, so that nothing is ever deleted before its
    replacement exists.

    Args:
        urls: the mirrors, tried in order. A failure (an HTTP error, a refused connection, a
            timeout, a truncated response, a checksum mismatch) moves on to the next.
        path: the destination; missing parent directories are created (and removed again, if
            still empty, when the download fails).
        md5: the expected MD5, 32 hex digits.
        timeout: seconds to wait for a connection or for the next bytes of a response.

    Returns:
        ``path``, as a ``Path``.

    Raises:
        DownloadError: every mirror failed; the message lists each URL and why it failed.
        TypeError: ``urls`` is a single string or holds something other than strings.
        TypeError: ``timeout`` is not a number.
        ValueError: ``urls`` is empty, ``md5`` is not 32 hex digits or ``timeout`` is not positive and finite.

    Example::

        download_file(["https://a.example/x.gz", "https://b.example/x.gz"], "data/x.gz",
                      md5="9fb629c4189551a2d022fa330f9573f3")
    """
    urls = _check_urls(urls)
    md5 = _check_md5(md5)
    timeout = _check_timeout(timeout)
    path = Path(os.fspath(path))
    existing_md5 = file_md5(path) if path.is_file() else None
    if existing_md5 == md5:
        return path

    created: list[Path] = []
    try:
        _make_folders(path.parent, created)
        _download_from_mirrors(urls, path, md5, timeout, existing_md5)
    except BaseException:  # including KeyboardInterrupt: a failed download leaves no empty folder
        _remove_if_empty(created)
        raise
    return path


def _download_from_mirrors(urls: list[str], path: Path, md5: str, timeout: float, existing_md5: Optional[str]) -> None:
    """Try each mirror in turn until one delivers the verified file; ``DownloadError`` if none does."""
    failures: list[tuple[str, str]] = []
    for url in urls:
        try:
            _download_verified(url, path, md5, timeout)
        except (urllib.error.URLError, HTTPException, OSError, ValueError) as error:
            log.warning("Downloading %s failed: %s", url, _reason(error))
            failures.append((url, _reason(error)))
            continue
        return
    note = ""
    if existing_md5 is not None:
        note = f"The existing {path} (md5 {existing_md5}, expected {md5}) was left as it was; delete it or try again."
    raise DownloadError(path, failures, note)


def _make_folders(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, appending each one made here to ``created``
    (outermost first) as soon as it exists, so that a failure halfway still knows them all.

    A folder that appears meanwhile (another process downloading too) is not counted as ours.
    """
    for candidate in [*reversed(folder.parents), folder]:
        if candidate.is_dir():
            continue
        try:
            candidate.mkdir()
        except FileExistsError:
            if candidate.is_dir():
                continue
            raise
        created.append(candidate)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove ``folders`` innermost first, each only if empty (another download may be using it)."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty, or already gone: either way, not ours to remove now
            return


def _download_verified(url: str, path: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file beside ``path``, check its MD5, then rename it onto ``path``."""
    log.info("Downloading %s to %s", url, path)
    temporary = _create_temporary_file(path)
    try:
        with open(temporary, "wb") as file:
            received_md5 = _stream_into(url, file, timeout)
        if received_md5 != md5:
            raise _ChecksumMismatch(f"md5 mismatch: got {received_md5}, expected {md5}")
        os.replace(temporary, path)
    except BaseException:  # including KeyboardInterrupt: no temporary file outlives a failed download
        temporary.unlink(missing_ok=True)
        raise


def _stream_into(url: str, file: BinaryIO, timeout: float) -> str:
    """Write the body of ``url`` to ``file`` chunk by chunk; the MD5 of what was written."""
    digest = _new_md5()
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _create_temporary_file(path: Path) -> Path:
    """A new, empty, uniquely named hidden file in ``path``'s directory.

    The same directory makes the final rename atomic (no copy across file systems). Mode 0o666
    lets the umask decide the permissions, as for any file the user creates; ``tempfile`` would
    make it private (0o600), and a shared cache would end up unreadable to others.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.part")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    os.close(descriptor)
    return temporary


def _check_urls(urls: object) -> list[str]:
    # A single string is a sequence too, of one-character "URLs": refuse it rather than try each character.
    if isinstance(urls, (str, bytes)) or not isinstance(urls, Sequence):
        raise TypeError(f"urls must be a sequence of URL strings, got {type(urls).__name__}: {urls!r:.120}")
    if not urls:
        raise ValueError("urls must name at least one mirror, got an empty sequence")
    for url in urls:
        if not isinstance(url, str):
            raise TypeError(f"urls must hold strings, got {type(url).__name__}: {url!r:.120}")
    return list(urls)


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}: {timeout!r:.80}")
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")
    return float(timeout)


def _check_md5(md5: object) -> str:
    if not isinstance(md5, str) or len(md5) != _MD5_LENGTH or not set(md5.lower()) <= set(string.hexdigits.lower()):
        raise ValueError(f"md5 must be {_MD5_LENGTH} hex digits, got {md5!r}")
    return md5.lower()


def _new_md5() -> "hashlib._Hash":
    # MD5 only detects corruption here; saying so keeps it available on FIPS-restricted systems.
    return hashlib.md5(usedforsecurity=False)


def _reason(error: BaseException) -> str:
    """A one-line reason: ``HTTP 404 Not Found``, ``timed out``, ``md5 mismatch: ...``."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, _ChecksumMismatch):
        return str(error)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
