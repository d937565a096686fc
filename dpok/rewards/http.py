"""A reward scored by a remote ``dpok reward-server`` (see :mod:`dpok.rewards.server` for the protocol).

``make_reward("http", url="http://127.0.0.1:8765")`` builds it (importing this module registers the
name ``http``). Only JSON and PNG cross the wire, never pickle.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import torch

from .base import Reward, RewardError
from .registry import register_reward
from .server import encode_images

RETRIED_CLIENT_STATUSES = frozenset({408, 429})
"""4xx statuses that are worth retrying (request timeout, too many requests); any other 4xx is final."""


class _Retryable(Exception):
    """One failed attempt that another attempt may fix (connection, timeout, 5xx, malformed answer)."""


class HttpReward(Reward):
    """Scores images by POSTing them (PNG, base64, in JSON) to ``{url}/score`` of a reward server.

    Each request has a ``timeout`` (seconds). Connection errors, timeouts, HTTP 5xx (e.g. 503),
    408 / 429 and malformed answers are retried up to ``retries`` times, waiting
    ``backoff * 2**attempt`` seconds before retry ``attempt`` (0, 1, ...). Any other 4xx (e.g. 401
    for a wrong token, 400 for a malformed request) fails at once with the server's error text.

    A ``null`` score from the server (its reward gave NaN / inf) becomes NaN here, so the sample is
    marked invalid and masked by the trainer, never scored 0.

    When every attempt fails, ``_compute`` raises :class:`RewardError` (naming the URL, the number of
    attempts and the last error) instead of returning made-up scores: the exception is what lets the
    caller keep the batch of samples whose scoring failed and score it again later, rather than
    losing it or training on it with wrong rewards.

    Scoring mostly waits on the network, so ``--reward-overlap auto`` scores it beside the sampling.
    """

    overlaps_sampling = True

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 ca_file: str | None = None) -> None:
        if not isinstance(url, str) or not url.strip():
            raise RewardError("the http reward needs url='http://HOST:PORT' of a running `dpok reward-server`")
        url = url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RewardError(f"bad reward server url {url!r}: expected e.g. 'http://127.0.0.1:8765'")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise RewardError(f"the http reward's timeout must be a positive number of seconds, got {timeout!r}")
        if int(retries) != retries or retries < 0:
            raise RewardError(f"the http reward's retries must be a whole number >= 0, got {retries!r}")
        if not (backoff >= 0 and math.isfinite(backoff)):
            raise RewardError(f"the http reward's backoff must be >= 0 seconds, got {backoff!r}")
        self.url = url
        self.token = token or None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        # https: the server's certificate is always verified, against ca_file (e.g. a self-signed
        # certificate) or the system's trusted authorities
        self._tls = None
        if ca_file and parts.scheme != "https":
            raise RewardError(f"a CA file ({ca_file!r}) is for an https:// reward server; the url is {url!r}")
        if parts.scheme == "https":
            try:
                self._tls = ssl.create_default_context(cafile=ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise RewardError(f"cannot read the reward server's CA file {ca_file!r}: {e}; give a PEM file") from None
        self._name = f"http:{url}"

    @property
    def name(self) -> str:  # type: ignore[override]
        """``http:<url>``; the registry's renaming to the bare spec ``http`` keeps the URL in the name."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        # make_reward sets the name to the spec term ("http"), which would drop the URL from logs and errors.
        self._name = f"http:{self.url}" if value == "http" else value

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> list[float]:
        if images.shape[0] == 0:
            return []
        body = json.dumps({"images": encode_images(images), "prompts": list(prompts)}).encode("utf-8")
        return self._post_with_retries(body, len(prompts))

    def _post_with_retries(self, body: bytes, batch: int) -> list[float]:
        endpoint = f"{self.url}/score"
        attempts = self.retries + 1
        last_error = "no attempt made"
        for attempt in range(attempts):
            if attempt > 0:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post_once(endpoint, body, batch)
            except _Retryable as e:
                last_error = str(e)
        raise RewardError(
            f"reward server {endpoint} failed after {attempts} attempt(s); last error: {last_error}. "
            "Check that `dpok reward-server` is running and reachable at that URL."
        )

    def _post_once(self, endpoint: str, body: bytes, batch: int) -> list[float]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._tls) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = _error_text(e)
            if e.code >= 500 or e.code in RETRIED_CLIENT_STATUSES:
                raise _Retryable(f"HTTP {e.code}: {detail}") from None
            raise RewardError(f"reward server {endpoint} rejected the request with HTTP {e.code}: {detail}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ssl.SSLCertVerificationError):
                raise RewardError(f"reward server {endpoint}: its TLS certificate does not verify ({e.reason.verify_message}); "
                                  "give the certificate of its authority with --reward-ca-file") from None
            raise _Retryable(f"cannot connect: {e.reason}") from None
        except (TimeoutError, OSError, http.client.HTTPException) as e:
            kind = "timed out" if isinstance(e, TimeoutError) else type(e).__name__
            raise _Retryable(f"{kind} (timeout {self.timeout:g} s): {e}") from None
        return _parse_scores(raw, batch)


def _error_text(error: urllib.error.HTTPError) -> str:
    """The ``error`` field of a JSON error answer, else its first 200 characters."""
    try:
        text = error.read().decode("utf-8", errors="replace")
    except Exception:  # the body of an error answer is only a hint
        return error.reason if isinstance(error.reason, str) else "no details"
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return text[:200] or "no details"
    if isinstance(payload, dict) and isinstance(payload.get("error"), str):
        return payload["error"]
    return text[:200]


def _parse_scores(raw: bytes, batch: int) -> list[float]:
    """The ``scores`` of a 200 answer as floats (null -> NaN); :class:`_Retryable` if the answer is malformed."""
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Retryable(f"malformed JSON answer: {e}") from None
    scores = payload.get("scores") if isinstance(payload, dict) else None
    if not isinstance(scores, list):
        raise _Retryable("malformed answer: no 'scores' list")
    if len(scores) != batch:
        raise _Retryable(f"malformed answer: {len(scores)} scores for {batch} images")
    out = []
    for s in scores:
        if s is None:
            out.append(math.nan)
        elif isinstance(s, int | float) and not isinstance(s, bool):
            out.append(float(s))
        else:
            raise _Retryable(f"malformed answer: score {s!r} is not a number or null")
    return out


@register_reward(
    "http",
    "scores from a remote `dpok reward-server` (options url=http[s]://HOST:PORT, token, timeout, retries, ca_file)",
)
def http_reward(url: str, token: str | None = None, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                ca_file: str | None = None) -> HttpReward:
    """The ``http`` reward: the scores of the reward server at ``url``."""
    return HttpReward(url, token=token, timeout=timeout, retries=retries, backoff=backoff, ca_file=ca_file)
