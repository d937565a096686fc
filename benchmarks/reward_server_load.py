"""Load test of ``dpok reward-server`` over loopback: concurrent clients, good and bad requests mixed.

One server process (``python -m dpok reward-server``, the shipped ``shapeworld-alignment`` reward,
a token and small limits) on 127.0.0.1; ``--clients`` threads each send ``--requests`` requests on
a kept-alive connection. About 60 % are good (1 to 8 images of 64x64 with prompts, the answer
checked against the reward computed in this process on the same decoded images: the same scores,
bit for bit, in the same order); the rest are bad, of the kinds in :data:`EXPECTED` (wrong token,
malformed JSON, wrong fields, mismatched lengths, a non-PNG image, too many images, a body over
the byte limit, a PNG whose header claims too many pixels, an unknown path), each of which must be
refused with its status and a JSON error naming the problem. Nothing may be lost: every request
gets its answer. The server's resident memory is sampled throughout (Linux ``/proc``), and its
peak (``VmHWM``) is reported against the resident memory after the first good request.

Run: ``python benchmarks/reward_server_load.py`` (8 clients x 250 requests, about a minute on two
cores); ``--json FILE`` writes the numbers. ``tests/e2e/test_reward_server_load.py`` runs a bounded
version of the same function.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "load-test-token"
MAX_IMAGES = 16
MAX_BODY_MB = 1.0
IMAGE_SIZE = 64
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE
GOOD_SHARE = 0.6

EXPECTED: dict[str, tuple[int, str]] = {
    "good": (200, ""),
    "bad-token": (401, "unauthorized"),
    "no-token": (401, "unauthorized"),
    "malformed-json": (400, "bad JSON"),
    "wrong-fields": (400, "must be a list"),
    "length-mismatch": (400, "length mismatch"),
    "not-png": (400, "not a decodable PNG"),
    "too-many-images": (413, "--max-images"),
    "body-too-large": (413, "--max-body-mb"),
    "pixel-bomb": (413, "--max-pixels"),
    "unknown-path": (404, "unknown path"),
}
"""Request kind -> (the status it must get, words its error must contain)."""


@dataclass
class LoadResult:
    """What a load test measured."""

    clients: int
    requests_per_client: int
    answered: dict[str, int] = field(default_factory=dict)  # kind -> requests answered as expected
    wrong: dict[str, int] = field(default_factory=dict)  # kind -> requests answered otherwise
    lost: int = 0  # requests with no answer (connection error, timeout)
    wrong_examples: list[str] = field(default_factory=list)
    images_scored: int = 0
    seconds: float = 0.0
    requests_per_s: float = 0.0
    rss_start_mib: float | None = None  # after the first good request
    rss_end_mib: float | None = None
    peak_rss_mib: float | None = None  # VmHWM: the most the server ever held
    server_alive: bool = False
    server_tracebacks: int = 0

    @property
    def total(self) -> int:
        """Requests sent."""
        return self.clients * self.requests_per_client

    @property
    def ok(self) -> bool:
        """Every request answered as it should be, none lost, the server still up with no traceback."""
        return (not self.lost and not sum(self.wrong.values()) and sum(self.answered.values()) == self.total
                and self.server_alive and not self.server_tracebacks)


def png_header_only(width: int, height: int) -> str:
    """A base64 PNG whose header claims ``width`` x ``height`` and which has no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


class GoodPool:
    """Pre-encoded good bodies (rendered ShapeWorld scenes, half with their own prompt, half with
    another) and the scores the server must answer for each, computed here with one thread, as the
    server runs."""

    def __init__(self, size: int, seed: int) -> None:
        import numpy as np
        import torch

        from dpok.rewards import make_reward
        from dpok.rewards.server import decode_images, encode_images
        from dpok.shapeworld import prompt_sets
        from dpok.shapeworld.render import render_prompt

        prompts = sorted({p for ps in prompt_sets().values() for p in ps})
        reward = make_reward("shapeworld-alignment")
        rng = random.Random(seed)
        np_rng = np.random.default_rng(seed)
        self.bodies: list[bytes] = []
        self.scores: list[list[float]] = []
        self.encoded: list[list[str]] = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(size):
                n = rng.randint(1, 8)
                drawn = [rng.choice(prompts) for _ in range(n)]
                pixels = np.stack([render_prompt(p, np_rng)[0] for p in drawn])
                images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
                batch_prompts = [p if rng.random() < 0.5 else rng.choice(prompts) for p in drawn]
                encoded = encode_images(images)
                out = reward(decode_images(encoded), batch_prompts)  # what the server sees after the PNG round trip
                self.bodies.append(json.dumps({"images": encoded, "prompts": batch_prompts}).encode())
                self.scores.append([float(s) for s in out.raw.tolist()])
                self.encoded.append(encoded)
        finally:
            torch.set_num_threads(threads)


def bad_request(kind: str, pool: GoodPool, rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, extra headers) of a request of bad ``kind``."""
    i = rng.randrange(len(pool.bodies))
    images = pool.encoded[i]
    if kind == "bad-token":
        return "/score", pool.bodies[i], {"Authorization": "Bearer not-the-token"}
    if kind == "no-token":
        return "/score", pool.bodies[i], {"Authorization": ""}
    if kind == "malformed-json":
        return "/score", pool.bodies[i][: rng.randint(1, 200)], {}
    if kind == "wrong-fields":
        return "/score", json.dumps({"images": images[0], "prompts": []}).encode(), {}
    if kind == "length-mismatch":
        return "/score", json.dumps({"images": images, "prompts": ["a red circle"] * (len(images) + 1)}).encode(), {}
    if kind == "not-png":
        fake = base64.b64encode(os.urandom(rng.randint(8, 400))).decode()
        return "/score", json.dumps({"images": [fake], "prompts": ["a red circle"]}).encode(), {}
    if kind == "too-many-images":
        many = (images * (MAX_IMAGES + 1))[: MAX_IMAGES + 1]
        return "/score", json.dumps({"images": many, "prompts": ["a red circle"] * len(many)}).encode(), {}
    if kind == "body-too-large":
        return "/score", b" " * (int(MAX_BODY_MB * 2**20) + rng.randint(1, 2**20)), {}
    if kind == "pixel-bomb":
        side = rng.choice([IMAGE_SIZE + 1, 1000, 30_000])
        return "/score", json.dumps({"images": [png_header_only(side, side)], "prompts": ["a red circle"]}).encode(), {}
    if kind == "unknown-path":
        return "/scores", pool.bodies[i], {}
    raise ValueError(f"unknown request kind {kind!r}")


class _ForkedServer:
    """A reward server in a forked child of this process (no interpreter start-up: for the test);
    the few methods of :class:`subprocess.Popen` that :class:`ServerProcess` uses."""

    def __init__(self, log: Path) -> None:
        read_end, write_end = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: serve until terminated, never return into the caller
            code = 1
            try:
                os.close(read_end)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
                import torch

                from dpok.rewards import make_reward
                from dpok.rewards.server import RewardServer, ServerLimits

                torch.set_num_threads(1)
                limits = ServerLimits(max_body_bytes=int(MAX_BODY_MB * 2**20), max_images=MAX_IMAGES,
                                      max_pixels=MAX_PIXELS, request_timeout_s=30.0)
                server = RewardServer(make_reward("shapeworld-alignment"), port=0, token=TOKEN, limits=limits)
                os.write(write_end, f"{server.url}\n".encode())
                os.close(write_end)
                server.serve_forever()
                code = 0
            except BaseException:  # noqa: B036 - report anything, then leave without running the parent's code
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            self.first_line = f"dpok reward-server: reward at {pipe.readline().strip()} (forked)"
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def terminate(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)

    kill = terminate

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout or 1e9)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired("forked reward server", timeout or 0)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]


class ServerProcess:
    """A reward server on a free loopback port, in its own process, with its memory sampled:
    ``python -m dpok reward-server`` (the command users run), or with ``fork=True`` a forked child
    of this process serving the same reward with the same limits (no start-up time)."""

    def __init__(self, log: Path, fork: bool = False) -> None:
        self.log = log
        self._stderr = None
        if fork:
            self.proc: subprocess.Popen | _ForkedServer = _ForkedServer(log)
            line = self.proc.first_line
        else:
            cmd = [sys.executable, "-m", "dpok", "reward-server", "--reward", "shapeworld-alignment", "--port", "0",
                   "--token", TOKEN, "--max-images", str(MAX_IMAGES), "--max-body-mb", str(MAX_BODY_MB),
                   "--max-pixels", str(MAX_PIXELS), "--request-timeout", "30"]
            # one thread, as the expected scores are computed (other thread counts round differently)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
            self._stderr = open(log, "wb")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
            line = self.proc.stdout.readline() if self.proc.stdout else ""
        match = re.search(r"at (https?://[^ ]+) ", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the reward server did not start: {line!r}; see {log}")
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.samples: list[float] = []
        self._done = threading.Event()
        self._monitor = threading.Thread(target=self._sample_memory, daemon=True)
        self._monitor.start()

    def memory(self, key: str) -> float | None:
        """``VmRSS`` or ``VmHWM`` of the server in MiB (None where /proc is missing)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(match.group(1)) / 1024 if match else None

    def _sample_memory(self) -> None:
        while not self._done.wait(0.05):
            rss = self.memory("VmRSS")
            if rss is not None:
                self.samples.append(rss)

    def alive(self) -> bool:
        """Whether the process runs and answers ``GET /health``."""
        if self.proc.poll() is not None:
            return False
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the server and its memory sampling."""
        if hasattr(self, "_done"):
            self._done.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._stderr is not None:
            self._stderr.close()


def _client(port: int, pool: GoodPool, n: int, seed: int, deadline: float, out: list[tuple[str, str, str]]) -> None:
    """Send ``n`` requests; append (kind, verdict, detail) for each: verdict ``ok``, ``wrong`` or ``lost``."""
    rng = random.Random(seed)
    bad_kinds = [k for k in EXPECTED if k != "good"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=max(1.0, min(60.0, deadline - time.monotonic())))
    try:
        for _ in range(n):
            if time.monotonic() > deadline:
                out.append(("timeout", "lost", "the load test's deadline passed"))
                continue
            kind = "good" if rng.random() < GOOD_SHARE else rng.choice(bad_kinds)
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
            if kind == "good":
                i = rng.randrange(len(pool.bodies))
                path, body = "/score", pool.bodies[i]
            else:
                path, body, extra = bad_request(kind, pool, rng)
                headers.update(extra)
                if not headers["Authorization"]:
                    del headers["Authorization"]
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                status, raw = response.status, response.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()  # a new connection for the next request
                out.append((kind, "lost", f"{type(e).__name__}: {e}"))
                continue
            want_status, words = EXPECTED[kind]
            try:
                answer = json.loads(raw)
            except json.JSONDecodeError:
                out.append((kind, "wrong", f"status {status}, not JSON: {raw[:100]!r}"))
                continue
            if status != want_status:
                out.append((kind, "wrong", f"status {status} (wanted {want_status}): {answer}"))
            elif kind == "good" and answer.get("scores") != pool.scores[i]:
                out.append((kind, "wrong", f"scores {answer.get('scores')} != {pool.scores[i]}"))
            elif kind != "good" and words not in str(answer.get("error", "")):
                out.append((kind, "wrong", f"error {answer.get('error')!r} lacks {words!r}"))
            else:
                out.append((kind, "ok", str(len(answer.get("scores") or []))))
    finally:
        conn.close()


def run_load_test(clients: int = 8, requests: int = 250, seed: int = 0, time_limit_s: float = 600.0,
                  log_dir: Path | None = None, pool_size: int = 24, fork: bool = False) -> LoadResult:
    """Run the load test (see the module docstring); never longer than about ``time_limit_s``.

    ``fork``: serve from a forked child of this process instead of ``python -m dpok reward-server``.
    """
    import tempfile

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="dpok-load-"))
    pool = GoodPool(pool_size, seed)
    result = LoadResult(clients, requests)
    server = ServerProcess(log_dir / "reward-server.log", fork=fork)
    try:
        # one good request first: the resident memory after it is the baseline of the peak
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/score", body=pool.bodies[0], headers={"Authorization": f"Bearer {TOKEN}"})
        first = json.loads(conn.getresponse().read())
        conn.close()
        if first.get("scores") != pool.scores[0]:
            raise RuntimeError(f"the server's scores {first} differ from the reward's {pool.scores[0]}")
        result.rss_start_mib = server.memory("VmRSS")
        outcomes: list[list[tuple[str, str, str]]] = [[] for _ in range(clients)]
        t0 = time.monotonic()
        deadline = t0 + time_limit_s
        threads = [threading.Thread(target=_client, args=(server.port, pool, requests, seed * 1000 + c + 1, deadline,
                                                          outcomes[c]), daemon=True) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()) + 60)
        result.seconds = time.monotonic() - t0
        answered, wrong = Counter(), Counter()
        for kind, verdict, detail in (o for per in outcomes for o in per):
            if verdict == "ok":
                answered[kind] += 1
                result.images_scored += int(detail) if kind == "good" else 0
            elif verdict == "wrong":
                wrong[kind] += 1
                if len(result.wrong_examples) < 10:
                    result.wrong_examples.append(f"{kind}: {detail}")
            else:
                result.lost += 1
                if len(result.wrong_examples) < 10:
                    result.wrong_examples.append(f"{kind} lost: {detail}")
        result.lost += result.total - sum(len(per) for per in outcomes)  # a client that never finished
        result.answered = dict(sorted(answered.items()))
        result.wrong = dict(sorted(wrong.items()))
        result.requests_per_s = sum(len(per) for per in outcomes) / result.seconds if result.seconds else 0.0
        result.rss_end_mib = server.memory("VmRSS")
        result.peak_rss_mib = server.memory("VmHWM")
        result.server_alive = server.alive()
    finally:
        server.stop()
    result.server_tracebacks = server.log.read_text(errors="replace").count("Traceback")
    return result


def describe(result: LoadResult) -> str:
    """A short text report of ``result``."""
    lines = [f"reward-server load test: {result.clients} clients x {result.requests_per_client} requests "
             f"in {result.seconds:.1f} s ({result.requests_per_s:.0f} requests/s)"]
    for kind in EXPECTED:
        status = EXPECTED[kind][0]
        lines.append(f"  {kind:16s} {status}  answered as expected {result.answered.get(kind, 0):5d}   "
                     f"otherwise {result.wrong.get(kind, 0)}")
    lines.append(f"  lost: {result.lost}; server alive after: {result.server_alive}; "
                 f"tracebacks in its log: {result.server_tracebacks}")
    if result.peak_rss_mib is not None:
        lines.append(f"  server memory: {result.rss_start_mib:.0f} MiB after the first request, "
                     f"{result.rss_end_mib:.0f} MiB at the end, peak {result.peak_rss_mib:.0f} MiB")
    lines += [f"  ! {e}" for e in result.wrong_examples]
    lines.append("PASS" if result.ok else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=250, help="requests per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds before unsent requests count as lost")
    parser.add_argument("--json", default="", help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    result = run_load_test(args.clients, args.requests, args.seed, args.time_limit)
    print(describe(result))
    if args.json:
        data = {**asdict(result), "total": result.total, "ok": result.ok}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
