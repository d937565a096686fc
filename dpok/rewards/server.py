"""Serve any reward over HTTP (JSON only), so training can score images with a reward living elsewhere.

Protocol (``dpok reward-server`` runs :func:`serve`; :class:`dpok.rewards.http.HttpReward` is the client):

- ``POST /score`` with the JSON body ``{"images": [<base64 PNG>, ...], "prompts": [str, ...]}``
  answers ``{"scores": [float or null, ...], "reward": NAME}``; ``null`` marks a sample whose
  score was NaN / inf (invalid: the trainer masks it, it is never a 0).
- ``GET /health`` answers ``{"status": "ok", "reward": NAME}``.
- Errors are JSON ``{"error": "..."}``: 400 for a malformed request (bad JSON, missing field,
  length mismatch, undecodable PNG), 401 for a missing / wrong token, 404 for an unknown path,
  413 for a request over one of the :class:`ServerLimits` (body bytes, images per request, pixels
  per image; the message names the limit), 500 when the reward itself fails.

The server binds 127.0.0.1 unless told otherwise. With a shared ``token`` every request must carry
``Authorization: Bearer <token>``, checked from the headers before any of the body is read, so an
unauthenticated client cannot make the server allocate anything. A connection that sends nothing
for ``limits.request_timeout_s`` is closed. With a certificate and key it serves HTTPS (the
standard library's ``ssl``; the client verifies the certificate, against ``--reward-ca-file`` for
a self-signed one). Bodies are parsed as JSON and images as PNG only (never pickle); a PNG's size
is read from its header and checked before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import math
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..options import group, option, option_errors
from .base import Reward, RewardError
from .config import RewardConfig
from .registry import make_reward

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
DISCARD_LIMIT_BYTES = 16 * 1024 * 1024
"""Of a body refused from its headers, at most this much is read (and dropped) after the answer, so
that closing the connection does not reset it before the client has read the answer."""
DISCARD_LIMIT_S = 5.0
"""... and for at most this many seconds (the token is still checked before any of the body is read)."""


@dataclass(frozen=True)
class ServerLimits:
    """What one request may hold; a request over a limit is refused with 413 naming it.

    The defaults take a training batch of 256 images of 1024x1024 (SDXL) in one request.
    """

    max_body_bytes: int = 256 * 1024 * 1024
    max_images: int = 1024
    max_pixels: int = 4096 * 4096  # per image (width x height)
    request_timeout_s: float = 60.0  # a connection idle this long (mid-request or between requests) is closed

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RewardError(f"reward server limit {name} must be a whole number >= 1, got {value!r}")
        if not (self.request_timeout_s > 0 and math.isfinite(self.request_timeout_s)):
            raise RewardError(f"reward server request_timeout_s must be > 0 seconds, got {self.request_timeout_s!r}")


@dataclass
class ServerConfig:
    """Settings of ``dpok reward-server`` (field help is the CLI help)."""

    reward: RewardConfig = group(RewardConfig, name="")
    host: str = option(DEFAULT_HOST, "address to bind (127.0.0.1: loopback only)")
    port: int = option(DEFAULT_PORT, "port")
    token: str = option("", "shared token clients must send as 'Authorization: Bearer TOKEN'")
    max_body_mb: float = option(256.0, "largest request body in MiB")
    max_images: int = option(1024, "most images in one request")
    max_pixels: int = option(4096 * 4096, "most pixels (width x height) of one image, checked before decoding")
    request_timeout: float = option(60.0, "seconds a connection may stay silent before it is closed")
    certfile: str = option("", "PEM certificate: serve HTTPS (with --keyfile unless it holds the key)")
    keyfile: str = option("", "PEM private key of --certfile")
    device: str = option("", "device for the reward model (empty: the reward's choice)")

    def validate(self) -> None:
        """Check every value before the reward loads; raise ValueError naming the option."""
        errors = option_errors(self)
        if not self.reward.name.strip():
            errors.append("give --reward, the reward name or spec to serve")
        if not 0 <= self.port < 65536:
            errors.append(f"--port must be in [0, 65535] (got {self.port})")
        try:
            self.limits()
        except RewardError as e:
            errors.append(str(e))
        if errors:
            raise ValueError("invalid settings:\n  " + "\n  ".join(errors))

    def limits(self) -> ServerLimits:
        """The request limits these settings give."""
        return ServerLimits(max_body_bytes=int(self.max_body_mb * 2**20), max_images=self.max_images,
                            max_pixels=self.max_pixels, request_timeout_s=self.request_timeout)

    def reward_options(self) -> dict[str, str]:
        """The reward's own options (``make_reward`` keywords) that are set."""
        return {**self.reward.options(), **({"device": self.device} if self.device else {})}


def serve_config(cfg: ServerConfig) -> None:
    """:func:`serve` with the settings of ``dpok reward-server``."""
    cfg.validate()
    serve(cfg.reward.name, host=cfg.host, port=cfg.port, token=cfg.token or None, limits=cfg.limits(),
          certfile=cfg.certfile or None, keyfile=cfg.keyfile or None, **cfg.reward_options())


class RequestError(ValueError):
    """A malformed request; its message goes back to the client with a 400."""


class LimitError(RequestError):
    """A request over one of the server's limits; answered with a 413."""


def encode_images(images: torch.Tensor) -> list[str]:
    """Float images (B, 3, H, W) in [0, 1] -> B base64 PNG strings (pixels rounded to uint8)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"encode_images expects a tensor of shape (B, 3, H, W), got {shape}")
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    encoded = []
    for array in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def decode_images(encoded: Sequence[str], max_pixels: int | None = None) -> torch.Tensor:
    """B base64 PNG strings (all of one size) -> float32 images (B, 3, H, W) in [0, 1].

    Raises :class:`RewardError` naming the index of an image that is not base64 PNG, or of one
    whose size differs from the first image's; :class:`LimitError` for an image of more than
    ``max_pixels`` pixels, read from the PNG header before anything is decoded (a small file can
    decode to gigabytes).
    """
    arrays: list[np.ndarray] = []
    for i, text in enumerate(encoded):
        if not isinstance(text, str):
            raise RewardError(f"image {i} is {type(text).__name__}, expected a base64 PNG string")
        try:
            data = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as e:
            raise RewardError(f"image {i} is not valid base64: {e}") from None
        try:
            with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
                width, height = image.size
                if max_pixels is not None and width * height > max_pixels:
                    raise LimitError(f"image {i} is {width}x{height} = {width * height} pixels, over the server's "
                                     f"limit of {max_pixels} pixels per image (--max-pixels)")
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except LimitError:
            raise
        except Image.DecompressionBombError as e:  # PIL's own ceiling, above any sane --max-pixels
            raise LimitError(f"image {i}: {e} (the server's limit is {max_pixels} pixels per image, --max-pixels)") from None
        except Exception as e:  # PIL raises many types for corrupt data
            raise RewardError(f"image {i} is not a decodable PNG: {type(e).__name__}: {e}") from None
        if arrays and array.shape != arrays[0].shape:
            raise RewardError(
                f"image {i} is {array.shape[1]}x{array.shape[0]} but image 0 is {arrays[0].shape[1]}x{arrays[0].shape[0]}; "
                "all images of a request must have one size"
            )
        arrays.append(array)
    if not arrays:
        return torch.zeros((0, 3, 0, 0), dtype=torch.float32)
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return stacked.to(torch.float32) / 255.0


def parse_score_request(body: bytes, limits: ServerLimits | None = None) -> tuple[torch.Tensor, list[str]]:
    """A ``/score`` request body -> (images (B, 3, H, W) in [0, 1], prompts); :class:`RequestError` if
    malformed, :class:`LimitError` if over ``limits`` (images per request, pixels per image)."""
    limits = limits or ServerLimits()
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"bad JSON body: {e}") from None
    except RecursionError:
        raise RequestError("bad JSON body: nested too deeply; the body is "
                           "{\"images\": [base64 PNG, ...], \"prompts\": [str, ...]}") from None
    if not isinstance(payload, dict):
        raise RequestError(f"the JSON body must be an object with 'images' and 'prompts', got {type(payload).__name__}")
    for key in ("images", "prompts"):
        if key not in payload:
            raise RequestError(f"missing field {key!r}; the body is {{\"images\": [base64 PNG, ...], \"prompts\": [str, ...]}}")
        if not isinstance(payload[key], list):
            raise RequestError(f"field {key!r} must be a list, got {type(payload[key]).__name__}")
    images, prompts = payload["images"], payload["prompts"]
    if len(images) != len(prompts):
        raise RequestError(f"length mismatch: {len(images)} images but {len(prompts)} prompts; give one prompt per image")
    if len(images) > limits.max_images:
        raise LimitError(f"{len(images)} images in one request, over the server's limit of {limits.max_images} "
                         "(--max-images); send smaller batches")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise RequestError(f"prompt {bad[0]} is not a string")
    try:
        tensor = decode_images(images, limits.max_pixels)
    except RewardError as e:  # a LimitError is a RequestError and passes through
        raise RequestError(str(e)) from None
    return tensor, list(prompts)


class RewardServer:
    """Serves ``reward`` at ``http://host:port`` (see the module docstring for the protocol).

    ``start()`` serves from a background thread and returns the bound port (port 0 picks a free
    one); ``stop()`` shuts it down; ``serve_forever()`` serves in the calling thread (the CLI).
    Requests are handled in threads, but the reward is called by one request at a time (a lock),
    since a reward model need not be thread-safe.
    """

    def __init__(self, reward: Reward, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None,
                 limits: ServerLimits | None = None, certfile: str | None = None, keyfile: str | None = None) -> None:
        if not isinstance(reward, Reward):
            raise RewardError(f"RewardServer needs a Reward, got {type(reward).__name__}")
        if keyfile and not certfile:
            raise RewardError("a TLS key file needs its certificate: give --certfile as well")
        self.reward = reward
        self.host = host
        self.token = token or None
        self.limits = limits or ServerLimits()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.tls = bool(certfile)
        context = _server_tls_context(certfile, keyfile) if certfile else None
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
        if context is not None:
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8765`` (``https://`` with TLS)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self) -> int:
        """Serve from a daemon thread; returns the bound port."""
        if self._thread is not None:
            raise RewardError("the reward server is already running")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="dpok-reward-server", daemon=True
        )
        self._thread.start()
        return self.port

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread) or KeyboardInterrupt."""
        try:
            self._httpd.serve_forever()
        finally:
            self._httpd.server_close()

    def stop(self) -> None:
        """Stop serving and close the socket (safe to call more than once)."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header value carries the token (always True without a token)."""
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest((header or "").strip().encode(), expected)

    def score(self, images: torch.Tensor, prompts: list[str]) -> list[float | None]:
        """Score with the wrapped reward; None where the score is NaN / inf."""
        with self._lock:
            out = self.reward(images, prompts)
        return [float(s) if bool(v) and math.isfinite(float(s)) else None for s, v in zip(out.raw.tolist(), out.valid)]


def _server_tls_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile or None)
    except (OSError, ssl.SSLError) as e:
        raise RewardError(f"cannot load the TLS certificate {certfile!r}"
                          f"{f' with key {keyfile!r}' if keyfile else ''}: {e}; give PEM files (--certfile, --keyfile)") from None
    return context


def _make_handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    limits = server.limits

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dpok-reward-server"
        timeout = limits.request_timeout_s  # socket timeout: a stalled client does not hold a thread forever

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            logger.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:  # the client must open a new connection for its next request
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _discard_body(self, length: int) -> None:
            """Read and drop (64 KiB at a time, nothing kept) what the client sends of a refused body,
            up to :data:`DISCARD_LIMIT_BYTES` and :data:`DISCARD_LIMIT_S`: closing a socket with unread
            data resets the connection, and the client, still sending, could lose the answer."""
            self.wfile.flush()
            left, deadline = min(length, DISCARD_LIMIT_BYTES), time.monotonic() + DISCARD_LIMIT_S
            try:
                while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(remaining)
                    chunk = self.rfile.read1(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:  # the client went away or stalled: nothing more to do
                pass

        def _check_token(self) -> bool:
            if server.authorized(self.headers.get("Authorization")):
                return True
            self._send(401, {"error": "unauthorized: send the header 'Authorization: Bearer <token>' with the server's token"})
            return False

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if not self._check_token():
                return
            if self.path.split("?", 1)[0] != "/health":
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
                return
            self._send(200, {"status": "ok", "reward": server.reward.name})

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            length_text = self.headers.get("Content-Length")
            try:
                length = int(length_text) if length_text is not None else -1
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self._send(400, {"error": "missing or bad Content-Length header"})
                return
            # everything that needs only the headers is checked before a byte of the body is read; the
            # connection is then closed, since the unread body would be taken for the next request
            if not server.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                self._check_token()
                self._discard_body(length)
                return
            if self.path.split("?", 1)[0] != "/score":
                self.close_connection = True
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
                self._discard_body(length)
                return
            if length > limits.max_body_bytes:
                self.close_connection = True
                self._send(413, {"error": f"body of {length} bytes is over the server's limit of {limits.max_body_bytes} "
                                          "bytes (--max-body-mb); send smaller batches"})
                self._discard_body(length)
                return
            body = self.rfile.read(length)
            if len(body) < length:
                self.close_connection = True
                self._send(400, {"error": f"body ended after {len(body)} of {length} bytes (Content-Length)"})
                return
            try:
                images, prompts = parse_score_request(body, limits)
            except LimitError as e:
                self._send(413, {"error": str(e)})
                return
            except RequestError as e:
                self._send(400, {"error": str(e)})
                return
            try:
                scores = server.score(images, prompts)
            except Exception as e:  # the reward's failure goes back to the client, the server keeps serving
                logger.exception("reward %r failed", server.reward.name)
                self._send(500, {"error": f"reward {server.reward.name!r} failed: {type(e).__name__}: {e}"})
                return
            self._send(200, {"scores": scores, "reward": server.reward.name})

    return Handler


def serve(
    reward_spec: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None,
    limits: ServerLimits | None = None, certfile: str | None = None, keyfile: str | None = None, **reward_options: Any
) -> None:
    """Build ``make_reward(reward_spec, **reward_options)`` and serve it until interrupted (``dpok reward-server``)."""
    limits = limits or ServerLimits()
    if certfile:
        _server_tls_context(certfile, keyfile)  # a bad certificate fails before the reward model loads
    reward = make_reward(reward_spec, **reward_options)
    server = RewardServer(reward, host=host, port=port, token=token, limits=limits, certfile=certfile, keyfile=keyfile)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving on {host} without a token; anyone who can reach it can use the reward", file=sys.stderr)
    print(f"dpok reward-server: reward {reward.name!r} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
