"""Images of a chat request: `image_url` parts resolved to decoded images, with the server's rules.

- `data:` URLs (base64) are decoded; the processor's pixel limit (PIL's decompression-bomb guard) applies.
- `file://` URLs only under `--allowed-local-media-path` (after resolving links, so none leads out).
- `http(s)://` URLs are refused unless the server was started with `--allow-remote-media`; then they are
  fetched with a time-out and a size cap, following at most a few redirects, to http(s) only.
Runs on the server's preprocessing threads, never on the event loop or the engine thread.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import urllib.parse
from pathlib import Path

import numpy as np

from ..errors import Lfm2VlError
from ..processing.image_processor import load_image
from .protocol import RequestError


def _data_url(url: str, param: str) -> io.BytesIO:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError("a data: image URL must be base64: data:image/<type>;base64,<data>", param=param)
    media_type = header[len("data:") : -len(";base64")]
    if media_type and not media_type.startswith("image/"):
        raise RequestError(f"a data: URL of type {media_type!r} is not an image", param=param)
    try:
        return io.BytesIO(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise RequestError("the data: image URL is not valid base64", param=param) from None


def _local_file(url: str, allowed: Path | None, param: str) -> Path:
    if allowed is None:
        raise RequestError(
            "file:// image URLs are refused: the server was not started with --allowed-local-media-path",
            param=param,
        )
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise RequestError(f"file:// URL on another host ({parsed.netloc!r})", param=param)
    path = Path(urllib.parse.unquote(parsed.path)).resolve()
    if not path.is_relative_to(allowed.resolve()):
        raise RequestError(f"{path} is outside --allowed-local-media-path", param=param)
    return path


def _remote(url: str, timeout: float, max_bytes: int, param: str) -> io.BytesIO:
    import httpx  # only a server that fetches needs it

    try:
        with (
            httpx.Client(follow_redirects=True, max_redirects=3, timeout=timeout) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise RequestError(f"fetching the image gave HTTP {response.status_code}", param=param)
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > max_bytes:
                    raise RequestError(f"the image at the URL is over {max_bytes} bytes", param=param)
    except httpx.HTTPError as error:  # time-out, refused connection, a redirect to another scheme
        raise RequestError(f"cannot fetch the image: {type(error).__name__}: {error}", param=param) from None
    return io.BytesIO(bytes(data))


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from (`lfm2vl serve`'s flags)."""

    allowed_local: Path | None = None  # --allowed-local-media-path
    remote: bool = False  # --allow-remote-media
    fetch_timeout: float = 10.0
    max_bytes: int = 32 * 2**20


def load_image_url(url: str, policy: MediaPolicy, param: str) -> np.ndarray:
    """The image of an `image_url` part as an (H, W, 3) uint8 array, or a `RequestError` naming `param`."""
    if url.startswith("data:"):
        source: io.BytesIO | Path = _data_url(url, param)
    elif url.startswith("file://"):
        source = _local_file(url, policy.allowed_local, param)
    elif url.startswith(("http://", "https://")):
        if not policy.remote:
            raise RequestError(
                "http(s) image URLs are not fetched by this server (--allow-remote-media); send the image "
                "inline as a base64 data: URL",
                param=param,
            )
        source = _remote(url, policy.fetch_timeout, policy.max_bytes, param)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else url[:20]
        raise RequestError(f"unsupported image URL scheme {scheme!r}; use a base64 data: URL", param=param)
    try:
        return load_image(source, param)
    except (Lfm2VlError, OSError) as error:  # undecodable, too many pixels, unreadable file
        raise RequestError(str(error), param=param) from None
