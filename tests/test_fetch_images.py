"""The thumbnail downloader against a real local HTTP server, failures included."""

from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from PIL import Image

from imgsearch_tools import fetch_images as fetch_module
from imgsearch_tools.fetch_images import fetch_images, read_photo_urls, sized_url


def jpeg_bytes(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, "JPEG")
    return buffer.getvalue()


class ImageServer:
    """Serves /ok/<n>.jpg, /missing (404), /flaky (503 twice, then an image), /garbage."""

    def __init__(self):
        self.requests: list[str] = []
        self.flaky_failures = 0
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                url = urlparse(self.path)
                with owner.lock:
                    owner.requests.append(self.path)
                if url.path.startswith("/ok/"):
                    width = int(parse_qs(url.query)["w"][0])
                    self._send(200, jpeg_bytes((width % 256, 10, 200)))
                elif url.path == "/flaky":
                    with owner.lock:
                        owner.flaky_failures += 1
                        failing = owner.flaky_failures <= 2
                    self._send(503, b"busy") if failing else self._send(200, jpeg_bytes((0, 0, 0)))
                elif url.path == "/garbage":
                    self._send(200, b"this is not a jpeg at all")
                else:
                    self._send(404, b"not found")

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def server():
    with ImageServer() as running:
        yield running


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(fetch_module, "BACKOFF_BASE_S", 0.01)


def write_photos(data_dir, base):
    rows = [
        ("okA", f"{base}/ok/a.jpg"),
        ("okB", f"{base}/ok/b.jpg?ixid=abc"),
        ("okC", f"{base}/ok/c.jpg"),
        ("gone", f"{base}/missing"),
        ("flaky", f"{base}/flaky"),
        ("junk", f"{base}/garbage"),
    ]
    header = "photo_id\tphoto_url\tphoto_image_url\tphoto_description\n"
    lines = [f"{pid}\thttps://unsplash.com/photos/{pid}\t{url}\tdesc\n" for pid, url in rows]
    (data_dir / "photos.tsv000").write_text(header + "".join(lines[:4]))
    (data_dir / "photos.tsv001").write_text(header + "".join(lines[4:]))


def test_sized_url():
    assert sized_url("https://x/photo-1", 400) == "https://x/photo-1?w=400"
    assert sized_url("https://x/photo-1?ixid=a", 200) == "https://x/photo-1?ixid=a&w=200"


def test_read_photo_urls_from_shards(tmp_path):
    write_photos(tmp_path, "http://h")
    rows = read_photo_urls(tmp_path)
    assert [pid for pid, _ in rows] == ["okA", "okB", "okC", "gone", "flaky", "junk"]
    (tmp_path / "photos.tsv001").write_text("photo_id\tother\nx\ty\n")
    with pytest.raises(ValueError, match="photo_image_url"):
        read_photo_urls(tmp_path)


def test_fetch_downloads_retries_and_resumes(tmp_path, server):
    write_photos(tmp_path, server.base)
    result = fetch_images(tmp_path, width=123, workers=4, retries=3, timeout=5, show_progress=False)
    assert result["total"] == 6
    assert result["downloaded"] == 4  # three ok + flaky after two 503s
    assert result["skipped"] == 0
    assert result["failed"] == 2
    assert result["failures"] == {"HTTP 404": 1, "not an image (UnidentifiedImageError)": 1}

    images = tmp_path / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "flaky.jpg",
        "okA.jpg",
        "okB.jpg",
        "okC.jpg",
    ]  # no temporary files left behind, nothing for the failures
    with Image.open(images / "okA.jpg") as image:
        assert image.size == (24, 16) and image.getpixel((5, 5))[0] in range(113, 134)
    assert server.requests.count("/missing?w=123") == 1  # 404 is not retried
    assert server.requests.count("/flaky?w=123") == 3
    assert server.requests.count("/garbage?w=123") == 1
    assert "/ok/b.jpg?ixid=abc&w=123" in server.requests

    server.requests.clear()
    again = fetch_images(tmp_path, width=123, workers=4, show_progress=False)
    assert again["skipped"] == 4 and again["downloaded"] == 0 and again["failed"] == 2
    assert not any(r.startswith("/ok/") or r.startswith("/flaky") for r in server.requests)


def test_retries_are_bounded(tmp_path, server):
    server.flaky_failures = -10  # twelve 503s before it would succeed
    (tmp_path / "photos.tsv").write_text(f"photo_id\tphoto_image_url\nflaky\t{server.base}/flaky\n")
    result = fetch_images(tmp_path, retries=2, workers=1, show_progress=False)
    assert result["failed"] == 1 and result["failures"] == {"HTTP 503": 1}
    assert server.requests.count("/flaky?w=400") == 3
    assert not (tmp_path / "images" / "flaky.jpg").exists()


def test_unreachable_server_fails_without_crashing(tmp_path):
    (tmp_path / "photos.tsv").write_text("photo_id\tphoto_image_url\nx\thttp://127.0.0.1:9/x\n")
    result = fetch_images(tmp_path, retries=1, workers=1, timeout=2, show_progress=False)
    assert result["failed"] == 1
    assert next(iter(result["failures"])).startswith("network:")
