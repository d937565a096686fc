"""The reward server and the http reward, over loopback (127.0.0.1) only."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dpok.rewards import Reward, RewardError, make_reward, register_reward
from dpok.rewards.http import HttpReward
from dpok.rewards.server import RewardServer, decode_images, encode_images

NAN_REWARD = "test-reward-server-nan-first"


class NanFirstReward(Reward):
    """Scores the mean pixel, except NaN for the first image."""

    name = NAN_REWARD

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = images.mean(dim=(1, 2, 3))
        scores[0] = math.nan
        return scores


@register_reward(NAN_REWARD, "test only: mean pixel, NaN for the first image")
def nan_first_reward() -> NanFirstReward:
    return NanFirstReward()


class RecordingReward(Reward):
    """Keeps the images it was given; scores 0."""

    name = "recording"

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.seen.append(images.clone())
        return torch.zeros(images.shape[0])


def _images(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture
def serve_reward() -> Iterator[Callable[..., RewardServer]]:
    """Start RewardServers on 127.0.0.1 (free ports); all are stopped at teardown."""
    servers: list[RewardServer] = []

    def start(reward: Reward, token: str | None = None) -> RewardServer:
        server = RewardServer(reward, host="127.0.0.1", port=0, token=token)
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


class FakeServer:
    """A tiny HTTP server whose ``/score`` answer is chosen per attempt by ``behave(attempt, handler)``."""

    def __init__(self, behave: Callable[[int, BaseHTTPRequestHandler], None]) -> None:
        self.attempts = 0
        self.release = threading.Event()  # set at teardown so a hanging handler returns
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                fake.attempts += 1
                behave(fake.attempts, self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeServer]]:
    fakes: list[FakeServer] = []

    def start(behave: Callable[[int, BaseHTTPRequestHandler], None]) -> FakeServer:
        fake = FakeServer(behave)
        fakes.append(fake)
        return fake

    try:
        yield start
    finally:
        for fake in fakes:
            fake.stop()


def _answer(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _ok(handler: BaseHTTPRequestHandler) -> None:
    _answer(handler, 200, json.dumps({"scores": [1.5, -2.0], "reward": "fake"}).encode())


def test_scores_over_http_equal_in_process(serve_reward: Callable[..., RewardServer]) -> None:
    local = make_reward("jpeg-compressibility")
    server = serve_reward(local)
    remote = make_reward("http", url=server.url, timeout=5.0, retries=0)
    assert remote.name == f"http:{server.url}"
    images = _images()
    out = remote(images, PROMPTS)
    expected = local(decode_images(encode_images(images)), PROMPTS)
    assert out.valid.all()
    assert torch.equal(out.raw, expected.raw)


def test_health(serve_reward: Callable[..., RewardServer]) -> None:
    import urllib.request

    server = serve_reward(make_reward("jpeg-compressibility"))
    with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok", "reward": "jpeg-compressibility"}


def test_server_decodes_the_png_round_trip(serve_reward: Callable[..., RewardServer]) -> None:
    recorder = RecordingReward()
    server = serve_reward(recorder)
    images = _images(1)
    HttpReward(server.url, timeout=5.0, retries=0)(images, PROMPTS)
    (seen,) = recorder.seen
    assert torch.equal(seen, decode_images(encode_images(images)))
    assert (seen - images).abs().max() <= 1 / 255 + 1e-6


def test_nan_scores_come_back_masked(serve_reward: Callable[..., RewardServer]) -> None:
    server = serve_reward(make_reward(NAN_REWARD))
    images = _images(2)
    out = HttpReward(server.url, timeout=5.0, retries=0)(images, PROMPTS)
    assert math.isnan(out.raw[0]) and not out.valid[0]
    assert out.valid[1] and out.scores[0] == 0.0
    assert out.raw[1] == pytest.approx(float(decode_images(encode_images(images))[1].mean()), abs=1e-6)


def test_malformed_request_is_400_naming_the_problem(serve_reward: Callable[..., RewardServer]) -> None:
    import urllib.error
    import urllib.request

    server = serve_reward(make_reward("jpeg-compressibility"))
    cases = {
        b"{not json": "bad JSON",
        b'{"images": []}': "prompts",
        json.dumps({"images": encode_images(_images()), "prompts": ["one"]}).encode(): "length mismatch",
        json.dumps({"images": ["aGVsbG8="], "prompts": ["p"]}).encode(): "PNG",
    }
    for body, words in cases.items():
        request = urllib.request.Request(f"{server.url}/score", data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 400
        assert words in json.loads(info.value.read())["error"]


def test_token_required(serve_reward: Callable[..., RewardServer]) -> None:
    server = serve_reward(make_reward("jpeg-compressibility"), token="s3cret")
    images = _images()
    for token in (None, "wrong"):
        with pytest.raises(RewardError, match="401") as info:
            HttpReward(server.url, token=token, timeout=5.0, retries=2, backoff=0.01)(images, PROMPTS)
        assert server.url in str(info.value)
    out = HttpReward(server.url, token="s3cret", timeout=5.0, retries=0)(images, PROMPTS)
    assert out.valid.all()


def test_retries_503_then_succeeds(fake_server: Callable[..., FakeServer]) -> None:
    def behave(attempt: int, handler: BaseHTTPRequestHandler) -> None:
        if attempt <= 2:
            _answer(handler, 503, b'{"error": "busy"}')
        else:
            _ok(handler)

    fake = fake_server(behave)
    out = HttpReward(fake.url, timeout=2.0, retries=3, backoff=0.01)(_images(), PROMPTS)
    assert fake.attempts == 3
    assert out.raw.tolist() == [1.5, -2.0]


def test_always_503_raises_naming_url_and_attempts(fake_server: Callable[..., FakeServer]) -> None:
    fake = fake_server(lambda attempt, handler: _answer(handler, 503, b'{"error": "overloaded"}'))
    with pytest.raises(RewardError) as info:
        HttpReward(fake.url, timeout=2.0, retries=2, backoff=0.01)(_images(), PROMPTS)
    message = str(info.value)
    assert fake.url in message and "3 attempt" in message and "503" in message and "overloaded" in message
    assert "dpok reward-server" in message
    assert fake.attempts == 3


def test_hanging_server_times_out(fake_server: Callable[..., FakeServer]) -> None:
    holder: dict[str, FakeServer] = {}

    def behave(attempt: int, handler: BaseHTTPRequestHandler) -> None:
        holder["fake"].release.wait(5)  # much longer than the client's timeout; released at teardown

    fake = fake_server(behave)
    holder["fake"] = fake
    start = time.monotonic()
    with pytest.raises(RewardError) as info:
        HttpReward(fake.url, timeout=0.3, retries=2, backoff=0.01)(_images(), PROMPTS)
    assert time.monotonic() - start < 3.0
    assert fake.url in str(info.value) and "3 attempt" in str(info.value)
    assert "timed out" in str(info.value)


def test_malformed_json_is_retried(fake_server: Callable[..., FakeServer]) -> None:
    fake = fake_server(lambda attempt, handler: _answer(handler, 200, b"{scores: oops"))
    with pytest.raises(RewardError, match="malformed JSON") as info:
        HttpReward(fake.url, timeout=2.0, retries=2, backoff=0.01)(_images(), PROMPTS)
    assert fake.attempts == 3
    assert fake.url in str(info.value)


def test_unreachable_port_raises_naming_url() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(RewardError) as info:
        HttpReward(url, timeout=1.0, retries=1, backoff=0.01)(_images(), PROMPTS)
    assert url in str(info.value) and "2 attempt" in str(info.value)


def test_bad_url_is_rejected() -> None:
    with pytest.raises(RewardError, match="url"):
        make_reward("http", url="127.0.0.1:8765")


def test_trainer_keeps_and_rescores_samples_when_the_reward_fails(tiny_pipeline_dir, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from dpok.config import build_config
    from dpok.rewards import RewardError
    from dpok.trainer import Trainer

    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility", prompt=["x"], rounds=1,
                                  samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                                  num_steps=2, eval_images=1, output_dir=str(tmp_path / "run")))
    trainer = Trainer(cfg)
    real = trainer.reward
    calls: list[int] = []

    def flaky(images, prompts):  # noqa: ANN001, ANN202
        calls.append(len(images))
        if len(calls) == 1:
            raise RewardError("http://127.0.0.1:9/score unreachable")
        return real(images, prompts)

    monkeypatch.setattr("time.sleep", lambda s: None)
    trainer.reward = flaky
    traj = trainer.sample(["x", "x"])
    out = trainer.score(traj)
    assert calls == [2, 2] and out.valid.all()
    torch.testing.assert_close(out.scores, real(traj.images, traj.prompts).scores)
    trainer.reward = lambda images, prompts: (_ for _ in ()).throw(RewardError("server down"))
    with pytest.raises(RewardError, match="scoring failed 3 times.*--resume"):
        trainer.score(traj)


def test_training_against_the_server_overlapped_is_the_same_as_in_line(serve_reward, tiny_pipeline_dir,  # noqa: ANN001
                                                                        tmp_path) -> None:  # noqa: ANN001
    """--reward http scores beside the sampling by default (auto: a remote reward, two batches a round):
    the same metrics and LoRA as in line, with the server's NaN scores masked alike."""
    import json

    from safetensors.torch import load_file

    from dpok.config import build_config
    from dpok.trainer import Trainer

    server = serve_reward(NanFirstReward())
    runs = {}
    for mode in ("off", "auto"):
        runs[mode] = tmp_path / mode
        cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="http", reward_url=server.url,
                                      prompt=["x"], rounds=2, samples_per_round=4, sample_batch_size=2,
                                      gradient_steps=1, num_steps=2, eval_images=1, report_to=["none"],
                                      reward_overlap=mode, output_dir=str(runs[mode])))
        Trainer(cfg).run()
    rows = {m: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for m, run in runs.items()}
    assert rows["off"] == rows["auto"] and all(r["reward/invalid"] == 2.0 for r in rows["auto"])
    a, b = (load_file(runs[m] / "lora/pytorch_lora_weights.safetensors") for m in ("off", "auto"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- hardening: authentication before the body, limits, idle connections, TLS


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, bytes]:
    """Send raw bytes; return (HTTP status, the answer's bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_the_token_is_checked_before_any_of_the_body_is_read(serve_reward: Callable[..., RewardServer]) -> None:
    server = serve_reward(make_reward("jpeg-compressibility"), token="s3cret")
    # a client announcing 200 MiB and sending none of it: refused at once from the headers alone (if the
    # server read first, it would wait for the body until the client's timeout)
    head = ("POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
            f"Content-Length: {200 * 2**20}\r\n\r\n")
    t0 = time.perf_counter()
    status, _ = _raw_request(server.port, head, timeout=3.0)
    assert status == 401 and time.perf_counter() - t0 < 2.0


def _png_header_only(width: int, height: int) -> str:
    """A PNG whose header claims width x height and whose pixel data is missing."""
    import base64
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")
    return base64.b64encode(png).decode()


def test_requests_over_a_limit_are_413_naming_the_limit() -> None:
    import urllib.error
    import urllib.request

    from dpok.rewards.server import ServerLimits

    limits = ServerLimits(max_body_bytes=200_000, max_images=2, max_pixels=48 * 48)
    with RewardServer(make_reward("jpeg-compressibility"), port=0, limits=limits) as server:
        small = encode_images(torch.rand(3, 3, 32, 32))
        cases = {
            b"x" * 200_001: "--max-body-mb",
            json.dumps({"images": small, "prompts": ["p"] * 3}).encode(): "--max-images",
            json.dumps({"images": encode_images(torch.rand(1, 3, 64, 64)), "prompts": ["p"]}).encode(): "--max-pixels",
            # a bomb: the header says 30000 x 30000; refused from the header, never decoded (decoding
            # this truncated file would be a 400)
            json.dumps({"images": [_png_header_only(5000, 4000)], "prompts": ["p"]}).encode(): "5000x4000",
            json.dumps({"images": [_png_header_only(30_000, 30_000)], "prompts": ["p"]}).encode(): "--max-pixels",
        }
        for body, words in cases.items():
            request = urllib.request.Request(f"{server.url}/score", data=body, method="POST")
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(request, timeout=5)
            assert info.value.code == 413, words
            assert words in json.loads(info.value.read())["error"]
        # within the limits it still scores
        assert HttpReward(server.url, retries=0)(torch.rand(2, 3, 32, 32), PROMPTS).valid.all()
    with pytest.raises(RewardError, match="max_images"):
        ServerLimits(max_images=0)


def test_a_silent_connection_is_closed_after_the_request_timeout() -> None:
    from dpok.rewards.server import ServerLimits

    with RewardServer(make_reward("jpeg-compressibility"), port=0, limits=ServerLimits(request_timeout_s=0.5)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")  # and then nothing
            t0 = time.perf_counter()
            assert sock.recv(1024) == b""  # the server hung up
            assert time.perf_counter() - t0 < 3.0
        assert HttpReward(server.url, retries=0)(_images(), PROMPTS).valid.all()  # and still serves


@pytest.fixture
def self_signed(tmp_path):  # noqa: ANN001, ANN201
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def test_https_with_a_certificate_the_client_verifies(self_signed) -> None:  # noqa: ANN001
    cert, key = self_signed
    reward = make_reward("jpeg-compressibility")
    with RewardServer(reward, port=0, token="s3cret", certfile=str(cert), keyfile=str(key)) as server:
        assert server.url.startswith("https://127.0.0.1:")
        images = _images()
        out = HttpReward(server.url, token="s3cret", retries=0, ca_file=str(cert))(images, PROMPTS)
        torch.testing.assert_close(out.scores, reward(images, PROMPTS).scores)
        # without the certificate's authority the client refuses the server, at once and by name
        with pytest.raises(RewardError, match="--reward-ca-file"):
            HttpReward(server.url, token="s3cret", retries=3, backoff=5.0)(images, PROMPTS)
    with pytest.raises(RewardError, match="cannot load the TLS certificate"):
        RewardServer(reward, port=0, certfile=str(key.parent / "missing.pem"))
    with pytest.raises(RewardError, match="https"):
        HttpReward("http://127.0.0.1:1", ca_file=str(cert))


def test_a_deeply_nested_body_is_a_400_not_a_crash(serve_reward: Callable[..., RewardServer]) -> None:
    import urllib.error
    import urllib.request

    server = serve_reward(make_reward("jpeg-compressibility"))
    request = urllib.request.Request(f"{server.url}/score", data=b"[" * 200_000, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 400 and "nested too deeply" in json.loads(info.value.read())["error"]
    assert HttpReward(server.url, retries=0)(_images(), PROMPTS).valid.all()


def test_a_body_refused_from_its_headers_still_gets_its_answer() -> None:
    """The client sends all of an over-limit body; the server answers 413 with 'Connection: close' and
    reads (and drops) the body before closing, so the answer is not lost to a connection reset."""
    import http.client

    from dpok.rewards.server import ServerLimits

    with RewardServer(make_reward("jpeg-compressibility"), port=0, token="t",
                      limits=ServerLimits(max_body_bytes=1000)) as server:
        for headers, status in (({"Authorization": "Bearer t"}, 413), ({"Authorization": "Bearer no"}, 401)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", "/score", body=b" " * (4 * 2**20), headers=headers)
            response = conn.getresponse()
            assert response.status == status and response.getheader("Connection") == "close"
            assert json.loads(response.read())["error"]
            conn.close()
