"""Serve any reward over HTTP (JSON only), so training can score images with a reward living elsewhere.

Protocol (``dpok reward-server`` runs :func:`serve`; :class:`dpok.rewards.http.HttpReward` is the client):

- ``POST /score`` with the JSON body ``{"images": [<base64 PNG>, ...], "prompts": [str, ...]}``
  answers ``{"scores": [float or null, ...], "reward": NAME}``; ``null`` marks a sample whose
  score was NaN / inf (invalid: the trainer masks it, it is never a 0).
- ``GET /health`` answers ``{"status": "ok", "reward": NAME}``.
- Errors are JSON ``{"error": "..."}``: 400 for a malformed request (bad JSON, missing field,
  length mismatch, undecodable PNG), 401 for a missing / wrong token, 404 for an unknown path,
  413 for an oversized body, 500 when the reward itself fails.

The server binds 127.0.0.1 unless told otherwise. With a shared ``token`` every request must carry
``Authorization: Bearer <token>``. Bodies are parsed as JSON and images as PNG only (never pickle).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import math
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import torch
from PIL import Image

from .base import Reward, RewardError
from .registry import make_reward

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
MAX_BODY_BYTES = 512 * 1024 * 1024
"""The largest request body the server reads (about a thousand 512x512 PNG images)."""


class RequestError(ValueError):
    """A malformed request; its message goes back to the client with a 400."""


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


def decode_images(encoded: Sequence[str]) -> torch.Tensor:
    """B base64 PNG strings (all of one size) -> float32 images (B, 3, H, W) in [0, 1].

    Raises :class:`RewardError` naming the index of an image that is not base64 PNG, or of one
    whose size differs from the first image's.
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
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
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


def parse_score_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """A ``/score`` request body -> (images (B, 3, H, W) in [0, 1], prompts); :class:`RequestError` if malformed."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(f"bad JSON body: {e}") from None
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
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise RequestError(f"prompt {bad[0]} is not a string")
    try:
        tensor = decode_images(images)
    except RewardError as e:
        raise RequestError(str(e)) from None
    return tensor, list(prompts)


class RewardServer:
    """Serves ``reward`` at ``http://host:port`` (see the module docstring for the protocol).

    ``start()`` serves from a background thread and returns the bound port (port 0 picks a free
    one); ``stop()`` shuts it down; ``serve_forever()`` serves in the calling thread (the CLI).
    Requests are handled in threads, but the reward is called by one request at a time (a lock),
    since a reward model need not be thread-safe.
    """

    def __init__(self, reward: Reward, host: str = DEFAULT_HOST, port: int = 0, token: str | None = None) -> None:
        if not isinstance(reward, Reward):
            raise RewardError(f"RewardServer needs a Reward, got {type(reward).__name__}")
        self.reward = reward
        self.host = host
        self.token = token or None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True

    @property
    def port(self) -> int:
        """The port the server is bound to."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8765``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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


def _make_handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "dpok-reward-server"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            logger.debug("%s - %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

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
            if length > MAX_BODY_BYTES:
                self.close_connection = True
                self._send(413, {"error": f"body of {length} bytes is over the limit of {MAX_BODY_BYTES}; send smaller batches"})
                return
            body = self.rfile.read(length)
            if not self._check_token():
                return
            if self.path.split("?", 1)[0] != "/score":
                self._send(404, {"error": f"unknown path {self.path!r}; use POST /score or GET /health"})
                return
            try:
                images, prompts = parse_score_request(body)
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
    reward_spec: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, token: str | None = None, **reward_options: Any
) -> None:
    """Build ``make_reward(reward_spec, **reward_options)`` and serve it until interrupted (``dpok reward-server``)."""
    reward = make_reward(reward_spec, **reward_options)
    server = RewardServer(reward, host=host, port=port, token=token)
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"warning: serving on {host} without a token; anyone who can reach it can use the reward", file=sys.stderr)
    print(f"dpok reward-server: reward {reward.name!r} at {server.url} (POST /score, GET /health)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
