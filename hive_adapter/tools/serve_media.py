"""Where `hive-serve` may take a request's pictures from, and how much of one it decodes.

vLLM's conventions: a `data:` URL is always accepted; a local file only under `--allowed-local-media-path`
(resolved, so neither `..` nor a symbolic link leads out of it); an `http(s)` URL only when its host is one of
`--allowed-media-domains`, with no redirect to another host, a time limit on the whole fetch and a byte cap.
Every local-file refusal says the same thing whatever the path (no oracle for which files exist). A picture's
size is read from its header and refused over `max_pixels` before any pixel is decoded.

`load_image(url, policy)` blocks (file and network reads, decoding): the server calls it off its event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_MEDIA_BYTES = 16 * 1024 * 1024
DEFAULT_FETCH_TIMEOUT = 5.0
MAX_REDIRECTS = 3


class MediaRefused(ValueError):
    """A picture the server will not read; the message says why and never quotes the payload. `where` is the
    request field (e.g. `messages[0].content[1].image_url`)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.where = message.split(":", 1)[0]


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: Path | None = None  # resolved; None: no local file is read
    allowed_media_domains: tuple[str, ...] = ()  # lower-case host names; empty: no URL is fetched
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT  # seconds for a whole fetch: connect, redirects, body
    formats: tuple[str, ...] = field(default=IMAGE_FORMATS)


def load_image(url: str, policy: MediaPolicy, where: str = "image_url"):
    """The picture `url` names, decoded to an RGB `PIL.Image`, or `MediaRefused` naming `where` and the reason."""
    if url.startswith("data:"):
        data = _data_url_bytes(url, policy, where)
    elif url.lower().startswith(("http://", "https://")):
        data = _fetch(url, policy, where)
    else:
        data = _local_file_bytes(url, policy, where)
    return _decode(data, policy, where)


def _data_url_bytes(url: str, policy: MediaPolicy, where: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaRefused(f"{where}: a data URL must be 'data:image/<format>;base64,<data>'")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise MediaRefused(f"{where}: the picture is over {policy.max_bytes} bytes (the server's --max-media-bytes)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaRefused(f"{where}: the data URL's payload is not valid base64") from None


def _local_file_bytes(url: str, policy: MediaPolicy, where: str) -> bytes:
    root = policy.allowed_local_media_path
    if root is None:
        raise MediaRefused(
            f"{where}: this server reads no local files; send the picture as a data: URL (base64), or start the "
            "server with --allowed-local-media-path DIR"
        )
    refusal = MediaRefused(
        f"{where}: not a readable picture file under the server's --allowed-local-media-path; send it as a data: "
        "URL, or give a path of a file inside that directory"
    )
    path = url[len("file://") :] if url.startswith("file://") else url
    candidate = Path(path) if Path(path).is_absolute() else root / path
    try:
        resolved = candidate.resolve(strict=True)  # follows every link: the target must lie under root
        if not resolved.is_relative_to(root) or not resolved.is_file():
            raise refusal
        if resolved.stat().st_size > policy.max_bytes:
            raise MediaRefused(f"{where}: the file is over {policy.max_bytes} bytes (the server's --max-media-bytes)")
        return resolved.read_bytes()
    except (OSError, RuntimeError):  # missing, unreadable, a link loop
        raise refusal from None


def _fetch(url: str, policy: MediaPolicy, where: str) -> bytes:
    import urllib.error

    if not policy.allowed_media_domains:
        raise MediaRefused(
            f"{where}: this server fetches no URLs; send the picture as a data: URL (base64), or start the server "
            "with --allowed-media-domains HOST[,HOST...]"
        )
    deadline = time.monotonic() + policy.fetch_timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    for _ in range(MAX_REDIRECTS + 1):
        _check_host(url, policy, where)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _too_slow(policy, where)
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "hive-serve"}), timeout=remaining) as r:
                return _read_capped(r, policy, deadline, where)
        except urllib.error.HTTPError as error:
            location = error.headers.get("Location") if error.code in (301, 302, 303, 307, 308) else None
            error.close()
            if location is None:
                raise MediaRefused(f"{where}: the URL answered HTTP {error.code}") from None
            url = urllib.parse.urljoin(url, location)
        except MediaRefused:
            raise
        except TimeoutError:
            raise _too_slow(policy, where) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", error)
            if isinstance(reason, TimeoutError):
                raise _too_slow(policy, where) from None
            raise MediaRefused(f"{where}: the URL could not be fetched ({type(reason).__name__})") from None
    raise MediaRefused(f"{where}: the URL redirects more than {MAX_REDIRECTS} times")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as an HTTPError, so that `_fetch` checks its target's host before following it."""

    def redirect_request(self, *args, **kwargs):
        return None


def _check_host(url: str, policy: MediaPolicy, where: str) -> None:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or (parsed.hostname or "").lower() not in policy.allowed_media_domains:
        raise MediaRefused(
            f"{where}: the URL's host is not one of the server's --allowed-media-domains (redirects too must stay "
            "on them); send the picture as a data: URL"
        )


def _read_capped(response, policy: MediaPolicy, deadline: float, where: str) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise MediaRefused(f"{where}: the picture is over {policy.max_bytes} bytes (the server's --max-media-bytes)")
    chunks, size = [], 0
    while True:
        chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise MediaRefused(
                f"{where}: the picture is over {policy.max_bytes} bytes (the server's --max-media-bytes)"
            )
        if time.monotonic() > deadline:
            raise _too_slow(policy, where)
        chunks.append(chunk)


def _too_slow(policy: MediaPolicy, where: str) -> MediaRefused:
    return MediaRefused(f"{where}: the URL did not deliver the picture within {policy.fetch_timeout:g} s")


def _decode(data: bytes, policy: MediaPolicy, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=list(policy.formats))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError):
        raise MediaRefused(f"{where}: the bytes are not a picture in one of {', '.join(policy.formats)}") from None
    width, height = image.size
    if width * height > policy.max_pixels:
        raise MediaRefused(
            f"{where}: the picture is {width}x{height} = {width * height} pixels, over the server's "
            f"--max-image-pixels {policy.max_pixels}; send a smaller one"
        )
    try:
        image.seek(0)  # the first frame of an animation
        return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise MediaRefused(f"{where}: the picture's data is broken (it could not be decoded)") from None
