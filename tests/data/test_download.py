"""Verified downloads against a local HTTP server: mirrors tried in order, nothing partial left behind."""

from __future__ import annotations

import hashlib
import pickle
import re
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from neurenix.data.download import DownloadError, download_file, file_md5

PAYLOAD = bytes(range(256)) * 5000  # 1.28 MB: more than one 1 MiB read chunk
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: LocalServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        respond = self.server.routes.get(self.path)
        if respond is None:
            self.send_error(404)
        else:
            respond(self)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


class LocalServer(ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that serves what a test registers and records every request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[str] = []
        self.release = threading.Event()  # lets slow responses finish when the test ends

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_port}{path}"

    def serve(self, path: str, body: bytes) -> str:
        self.routes[path] = lambda handler: _send(handler, body, declared_length=len(body))
        return self.url(path)

    def serve_truncated(self, path: str, body: bytes) -> str:
        """Declare the full length, send half, close: a dropped connection."""
        self.routes[path] = lambda handler: _send(handler, body[: len(body) // 2], declared_length=len(body))
        return self.url(path)

    def serve_after(self, delay: float, path: str, body: bytes) -> str:
        def respond(handler: BaseHTTPRequestHandler) -> None:
            self.release.wait(delay)
            _send(handler, body, declared_length=len(body))

        self.routes[path] = respond
        return self.url(path)

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (timeout test) makes the late write fail; that is expected


def _send(handler: BaseHTTPRequestHandler, body: bytes, *, declared_length: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", str(declared_length))
    handler.end_headers()
    handler.wfile.write(body)
    handler.close_connection = True


@pytest.fixture
def server() -> Iterator[LocalServer]:
    local = LocalServer()
    thread = threading.Thread(target=local.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)  # quick shutdown
    thread.start()
    yield local
    local.release.set()
    local.shutdown()
    local.server_close()


def closed_port_url(path: str = "/file") -> str:
    """A URL on a port nothing listens on: the connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


def files_in(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_downloads_and_verifies(server: LocalServer, tmp_path: Path) -> None:
    url = server.serve("/data.bin", PAYLOAD)
    destination = tmp_path / "new" / "folder" / "data.bin"
    assert download_file([url], destination, PAYLOAD_MD5) == destination
    assert destination.read_bytes() == PAYLOAD
    assert server.requests == ["/data.bin"]
    assert files_in(destination.parent) == ["data.bin"]  # no temporary file left over


def test_failing_mirrors_are_skipped_in_order(server: LocalServer, tmp_path: Path) -> None:
    missing = server.url("/missing.bin")
    refused = closed_port_url()
    truncated = server.serve_truncated("/half.bin", PAYLOAD)
    good = server.serve("/data.bin", PAYLOAD)
    destination = tmp_path / "data.bin"
    download_file([missing, refused, truncated, good], destination, PAYLOAD_MD5)
    assert destination.read_bytes() == PAYLOAD
    assert server.requests == ["/missing.bin", "/half.bin", "/data.bin"]
    assert files_in(tmp_path) == ["data.bin"]


def test_a_mirror_that_times_out_is_skipped(server: LocalServer, tmp_path: Path) -> None:
    slow = server.serve_after(5.0, "/slow.bin", PAYLOAD)
    good = server.serve("/data.bin", PAYLOAD)
    download_file([slow, good], tmp_path / "data.bin", PAYLOAD_MD5, timeout=0.2)
    assert (tmp_path / "data.bin").read_bytes() == PAYLOAD
    assert server.requests == ["/slow.bin", "/data.bin"]


def test_checksum_mismatch_everywhere_raises_and_leaves_no_file(server: LocalServer, tmp_path: Path) -> None:
    corrupt = PAYLOAD[:-1] + b"\x00"
    urls = [server.serve("/a.bin", corrupt), server.serve("/b.bin", corrupt)]
    destination = tmp_path / "data.bin"
    with pytest.raises(DownloadError) as caught:
        download_file(urls, destination, PAYLOAD_MD5)
    message = str(caught.value)
    reason = f"md5 mismatch: got {hashlib.md5(corrupt).hexdigest()}, expected {PAYLOAD_MD5}"
    for url in urls:
        assert f"{url}: {reason}" in message
    assert [url for url, _ in caught.value.failures] == urls
    assert str(pickle.loads(pickle.dumps(caught.value))) == message  # crosses process boundaries intact
    assert isinstance(caught.value, RuntimeError)
    assert files_in(tmp_path) == []  # neither the final file nor a temporary one


def test_a_failed_download_removes_the_empty_folders_it_created_and_only_those(server: LocalServer, tmp_path: Path) -> None:
    kept = tmp_path / "data"
    kept.mkdir()  # the user's own folder: empty, but not the download's to remove
    with pytest.raises(DownloadError):
        download_file([server.url("/missing.bin"), closed_port_url()], kept / "MNIST" / "raw" / "data.bin", PAYLOAD_MD5)
    assert files_in(tmp_path) == ["data"] and files_in(kept) == []


def test_a_download_interrupted_by_the_user_removes_its_folders(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("neurenix.data.download._download_verified", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download_file([server.serve("/data.bin", PAYLOAD)], tmp_path / "new" / "folder" / "data.bin", PAYLOAD_MD5)
    assert files_in(tmp_path) == []


def test_a_created_folder_that_holds_something_else_is_kept(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another download (another file, another process) may be using a folder this one created."""
    raw = tmp_path / "MNIST" / "raw"

    def other_file_arrives_then_this_fails(url: str, path: Path, md5: str, timeout: float) -> None:
        (raw / "other.bin").write_bytes(b"x")
        raise ValueError("md5 mismatch")

    monkeypatch.setattr("neurenix.data.download._download_verified", other_file_arrives_then_this_fails)
    with pytest.raises(DownloadError):
        download_file([server.url("/data.bin")], raw / "data.bin", PAYLOAD_MD5)
    assert files_in(raw) == ["other.bin"]


def test_the_error_says_why_each_mirror_failed(server: LocalServer, tmp_path: Path) -> None:
    missing, refused = server.url("/missing.bin"), closed_port_url()
    with pytest.raises(DownloadError) as caught:
        download_file([missing, refused], tmp_path / "data.bin", PAYLOAD_MD5)
    reasons = dict(caught.value.failures)
    assert reasons[missing] == "HTTP 404 Not Found"
    assert "refused" in reasons[refused].lower()
    assert f"could not download data.bin to {tmp_path / 'data.bin'}" in str(caught.value)


def test_a_verified_copy_is_kept_without_any_request(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "data.bin"
    destination.write_bytes(PAYLOAD)
    modified = destination.stat().st_mtime_ns
    download_file([server.serve("/data.bin", b"other bytes")], destination, PAYLOAD_MD5)
    assert server.requests == []
    assert destination.stat().st_mtime_ns == modified


def test_a_corrupted_copy_is_replaced_by_a_verified_download(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "data.bin"
    destination.write_bytes(PAYLOAD[:1000])  # an interrupted copy made by some other tool
    download_file([server.serve("/data.bin", PAYLOAD)], destination, PAYLOAD_MD5)
    assert destination.read_bytes() == PAYLOAD
    assert files_in(tmp_path) == ["data.bin"]


def test_a_corrupted_copy_stays_untouched_when_no_replacement_can_be_verified(server: LocalServer, tmp_path: Path) -> None:
    destination = tmp_path / "data.bin"
    destination.write_bytes(b"stale")
    with pytest.raises(DownloadError, match=f"The existing .*md5 {hashlib.md5(b'stale').hexdigest()}.* was left as it was"):
        download_file([server.url("/missing.bin")], destination, PAYLOAD_MD5)
    assert destination.read_bytes() == b"stale"
    assert files_in(tmp_path) == ["data.bin"]


def test_md5_is_case_insensitive(server: LocalServer, tmp_path: Path) -> None:
    download_file([server.serve("/data.bin", PAYLOAD)], tmp_path / "data.bin", PAYLOAD_MD5.upper())
    assert file_md5(tmp_path / "data.bin") == PAYLOAD_MD5


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"urls": "http://127.0.0.1/x"}, TypeError, "urls must be a sequence of URL strings, got str"),
        ({"urls": []}, ValueError, "urls must name at least one mirror"),
        ({"urls": [b"http://127.0.0.1/x"]}, TypeError, "urls must hold strings, got bytes"),
        ({"md5": "abc"}, ValueError, "md5 must be 32 hex digits, got 'abc'"),
        ({"md5": "z" * 32}, ValueError, "md5 must be 32 hex digits"),
        ({"timeout": 0}, ValueError, "timeout must be a positive, finite number of seconds, got 0"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds, got str: '5'"),
    ],
)
def test_invalid_arguments_are_named(tmp_path: Path, arguments: dict, error: type, message: str) -> None:
    call = {"urls": ["http://127.0.0.1:9/x"], "path": tmp_path / "x", "md5": PAYLOAD_MD5, **arguments}
    with pytest.raises(error, match=re.escape(message)):
        download_file(**call)
    assert files_in(tmp_path) == []
