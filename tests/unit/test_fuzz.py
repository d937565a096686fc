"""Fuzzed inputs (hypothesis): prompts (grammar), prompt files, config values and files, reward-server
bodies. Every input either works or gets a clear error of its documented type; never another
exception (a traceback), a hang, or a partial run folder.

``DPOK_FUZZ_EXAMPLES=N`` sets the examples per target (default: a few dozen, seconds in all);
``DPOK_FUZZ_REPORT=FILE`` writes the number of examples tried per target to ``FILE`` (JSON).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import string
import tempfile
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpok.algorithms import ALGORITHMS
from dpok.config import TrainConfig, build_config
from dpok.configfile import ConfigFile, ConfigFileError, read_config_file
from dpok.domains import Domain
from dpok.options import option_fields
from dpok.prompts import PromptFileError, load_prompt_file, resolve_prompts
from dpok.rewards.server import RequestError, ServerLimits, encode_images, parse_score_request
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD
from dpok.shapeworld.grammar import COLORS, SHAPES, Group, PromptError, format_prompt, parse_prompt, vocabulary

TRIED: Counter[str] = Counter()
"""Examples tried per target in this session."""


def fuzz(default: int) -> settings:
    """Hypothesis settings of one target: ``default`` examples (``DPOK_FUZZ_EXAMPLES`` overrides), no deadline."""
    examples = int(os.environ.get("DPOK_FUZZ_EXAMPLES") or default)
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _report_counts() -> Iterator[None]:
    yield
    target = os.environ.get("DPOK_FUZZ_REPORT")
    if target:
        Path(target).write_text(json.dumps(dict(sorted(TRIED.items())), indent=2) + "\n")


# ------------------------------------------------------------------------------------------- prompts

@st.composite
def grammar_prompts(draw: st.DrawFn) -> str:
    """A prompt of the ShapeWorld grammar, any of its three forms."""
    pairs = st.tuples(st.sampled_from(sorted(COLORS)), st.sampled_from(SHAPES))
    form = draw(st.sampled_from(["one", "two", "relation"]))
    if form == "one":
        color, shape = draw(pairs)
        return format_prompt((Group(draw(st.integers(1, 4)), color, shape),))
    a, b = draw(st.lists(pairs, min_size=2, max_size=2, unique=True))
    if form == "two":
        return format_prompt((Group(draw(st.integers(1, 3)), *a), Group(draw(st.integers(1, 3)), *b)))
    return format_prompt((Group(1, *a), Group(1, *b)), draw(st.sampled_from(["left of", "above"])))


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """``base`` with a few characters inserted, deleted or replaced."""
    text = list(draw(base))
    alphabet = st.sampled_from(string.ascii_letters + string.digits + " .,\t\n\r\x00é雪")
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            text.insert(i, draw(alphabet))
        elif text and i < len(text):
            if op == "delete":
                del text[i]
            else:
                text[i] = draw(alphabet)
    return "".join(text)


word_soup = st.lists(st.sampled_from(vocabulary() + ["an", "the", "left", "below", "1", "", "Red", "five"]),
                     max_size=9).map(" ".join)
any_prompt = st.one_of(grammar_prompts(), mutated(grammar_prompts()), word_soup, st.text(max_size=60))


@fuzz(300)
@given(grammar_prompts())
def test_fuzz_grammar_prompts_parse_and_round_trip(prompt: str) -> None:
    TRIED["prompt grammar (valid)"] += 1
    parsed = parse_prompt(prompt)
    assert parsed.text() == prompt
    assert 1 <= parsed.num_objects <= 4 + (2 if parsed.form == "two-groups" else 0)


@fuzz(500)
@given(any_prompt)
def test_fuzz_any_text_parses_or_is_a_prompt_error(prompt: str) -> None:
    TRIED["prompt grammar (any text)"] += 1
    try:
        parsed = parse_prompt(prompt)
    except PromptError as e:
        assert repr(prompt) in str(e) or "prompt" in str(e)
        return
    assert parse_prompt(parsed.text()) == parsed  # what it parsed to is itself in the grammar


@fuzz(200)
@given(st.lists(any_prompt, max_size=5), st.sampled_from([None, SHAPEWORLD]),
       st.sampled_from([None, "hard", "seen", "no-such-set"]))
def test_fuzz_prompt_resolution(prompts: list[str], grammar: Domain | None, prompt_set: str | None) -> None:
    TRIED["prompt lists (--prompt, --prompt-set)"] += 1
    try:
        out = resolve_prompts(prompts, None, prompt_set, grammar)
    except ValueError as e:  # PromptError is a ValueError
        assert str(e)
        return
    assert out and len(out) == len(set(out)) and all(p == p.strip() and p for p in out)
    if grammar:
        for p in out:
            parse_prompt(p)


# ------------------------------------------------------------------------------------------ prompt files

line_text = st.one_of(grammar_prompts(), any_prompt, st.just("# a comment"), st.just(""), st.just("   "))


@st.composite
def prompt_file_bytes(draw: st.DrawFn) -> bytes:
    """Prompt-file content: lines of prompts, comments, blanks with any line ending, a BOM, bad bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    lines = draw(st.lists(line_text, max_size=8))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    data = sep.join(lines).encode("utf-8")
    if draw(st.booleans()):
        data += sep.encode()
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\x00", b"\xed\xa0\x80"])) + data[i:]
    return data


@fuzz(300)
@given(prompt_file_bytes(), st.sampled_from([None, SHAPEWORLD]))
def test_fuzz_prompt_files(data: bytes, grammar: Domain | None) -> None:
    TRIED["prompt files"] += 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "prompts.txt"
        path.write_bytes(data)
        try:
            prompts = load_prompt_file(path, grammar)
        except PromptFileError as e:
            assert str(path) in str(e)
            return
    text = data.decode("utf-8-sig")
    expected = [s for s in (line.strip() for line in text.split("\n")) if s and not s.startswith("#")]
    assert prompts == expected
    if grammar:
        for p in prompts:
            parse_prompt(p)


# ------------------------------------------------------------------------------------------ config values

def _kind_name(kind: object) -> str:
    if typing.get_origin(kind) is typing.Literal:
        return "str"
    return kind.__name__ if isinstance(kind, type) else str(kind)


FIELD_TYPES = {o.name: _kind_name(o.kind) for o in option_fields(TrainConfig)}
CHOICES = {"algorithm": ALGORITHMS.names(),
           **{o.name: list(typing.get_args(o.kind)) for o in option_fields(TrainConfig)
              if typing.get_origin(o.kind) is typing.Literal}}
NUMBERS = st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 2, 1000, 2**31, -2**31]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1e-4, 0.5, 1.0, 5.0, -1.0]))
PATHS_NOT_USED = {"resume", "output_dir", "model", "prompt_file", "alignment_model", "reward_model", "reward_head",
                  "reward_processor", "reward_ca_file", "prompt_set", "eval_prompt_set"}


def value_for(name: str) -> st.SearchStrategy:
    """Values of field ``name``'s type (as the CLI or a config file delivers them), valid and not."""
    kind = FIELD_TYPES[name]
    if name in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[name]), st.text(max_size=8))
    if kind == "int":
        return NUMBERS
    if kind == "float":
        return FLOATS
    if kind == "bool":
        return st.booleans()
    if kind.startswith("list"):
        return st.lists(st.text(max_size=12), max_size=3)
    return st.text(max_size=12)


config_values = st.lists(st.sampled_from(sorted(set(FIELD_TYPES) - PATHS_NOT_USED)), max_size=8, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({n: value_for(n) for n in names}))


@fuzz(500)
@given(config_values, st.sampled_from([None, "dpok-paper", "ddpo-paper", "shapeworld-cpu"]))
def test_fuzz_config_values(values: dict, preset: str | None) -> None:
    TRIED["config values"] += 1
    try:
        cfg = build_config(preset, values)
    except ValueError as e:
        assert "invalid settings" in str(e) or "--" in str(e)
        return
    resolved = cfg.resolved(1)  # an accepted config is one a run can use
    assert resolved.sample_batch_size >= 1 and resolved.samples_per_round % resolved.sample_batch_size == 0
    options = cfg.to_dict()
    for name, kind in FIELD_TYPES.items():
        value = options[name]
        if kind == "float":
            assert value == value and abs(value) != float("inf"), f"{name} = {value} accepted"


FLOAT_FIELDS = sorted(n for n, k in FIELD_TYPES.items() if k == "float")


@fuzz(100)
@given(st.sampled_from(FLOAT_FIELDS), st.sampled_from([float("inf"), float("-inf"), float("nan")]))
def test_fuzz_non_finite_numbers_are_refused_by_name(name: str, value: float) -> None:
    TRIED["config values (non-finite numbers)"] += 1
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')}"):
        build_config(None, {name: value})


# ------------------------------------------------------------------------------------------ config files

KEYS = st.one_of(st.sampled_from(sorted(FIELD_TYPES)), st.sampled_from(sorted(FIELD_TYPES)).map(lambda k: k.replace("_", "-")),
                 st.sampled_from(["learning_rat", "lr", "preset", "seed ", "Rounds", ""]), st.text(max_size=10))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False), st.text(max_size=10))
TOML_LEAVES = st.one_of(st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False), st.text(max_size=10))


def nested(leaves: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=6)


@st.composite
def config_file_text(draw: st.DrawFn) -> tuple[str, bytes]:
    """(suffix, content) of a config file: mappings dumped as YAML/TOML, then maybe damaged."""
    suffix = draw(st.sampled_from([".yaml", ".yml", ".toml", ".json", ""]))
    toml = suffix == ".toml"
    mapping = draw(st.dictionaries(KEYS, st.one_of(value_for("learning_rate"), value_for("rounds"), value_for("prompt"),
                                                   value_for("algorithm"), nested(TOML_LEAVES if toml else LEAVES)),
                                   max_size=6))
    if toml:
        import tomli_w

        text = tomli_w.dumps({k: v for k, v in mapping.items() if v == v})
    else:
        text = yaml.safe_dump(mapping, allow_unicode=True)
    choice = draw(st.integers(0, 5))
    if choice == 0:
        text = draw(mutated(st.just(text)))
    elif choice == 1:
        text = draw(st.sampled_from(["[" * 2000, "a: " + "[" * 2000, "x = " + "[" * 2000, "- a\n- b\n", "42", ":",
                                     "a: &x [1]\nb: *x\n", "'unterminated", "a = 1\na = 2\n", "\t: tab",
                                     'a: "\\U7fffffff"', 'x = "\\UFFFFFFFF"', 'a: "\\xZZ"']))
    data = text.encode("utf-8", errors="surrogatepass")
    if draw(st.integers(0, 6)) == 0:
        data = b"\xff\xfe" + data
    return suffix, data


@fuzz(60)
@given(config_file_text())
def test_fuzz_config_files(file: tuple[str, bytes]) -> None:
    TRIED["config files"] += 1
    suffix, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"settings{suffix}"
        path.write_bytes(data)
        try:
            source = read_config_file(path, TrainConfig, extra={"preset": str})
        except ConfigFileError as e:
            assert str(path) in str(e) or "invalid config file" in str(e)
            return
    assert isinstance(source, ConfigFile)
    values = dict(source.values)
    preset = values.pop("preset", None)
    try:
        build_config(preset, values)
    except ValueError as e:
        assert str(e)


@pytest.mark.parametrize("suffix,text", [(".yaml", 'a: "\\U7fffffff"'), (".yaml", "a: " + "[" * 3000),
                                         (".toml", "x = " + "[" * 3000), (".toml", 'x = "\\UFFFFFFFF"')])
def test_config_files_that_broke_the_parsers(tmp_path: Path, suffix: str, text: str) -> None:
    """Found by the fuzzing above: PyYAML's ValueError for an escape past Unicode, RecursionErrors."""
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigFileError, match="not valid"):
        read_config_file(path, TrainConfig)


# ------------------------------------------------------------------------------------------ reward-server bodies

LIMITS = ServerLimits(max_body_bytes=1 << 20, max_images=4, max_pixels=32 * 32)
GOOD_PNGS = encode_images(torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
OTHER_SIZE_PNG = encode_images(torch.rand(1, 3, 4, 6))[0]


def png_header_only(width: int, height: int) -> str:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")).decode()


image_items = st.one_of(
    st.sampled_from(GOOD_PNGS), st.just(OTHER_SIZE_PNG),
    st.builds(png_header_only, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.sampled_from(GOOD_PNGS).map(lambda s: s[: len(s) // 2]),  # truncated base64 / PNG
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=20), st.integers(), st.none(), st.lists(st.integers(), max_size=2))
json_values = nested(LEAVES)


@st.composite
def score_bodies(draw: st.DrawFn) -> bytes:
    """``/score`` bodies: near-valid objects, any JSON, deep nesting, any bytes."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        depth = draw(st.integers(1, 100_000))
        return (draw(st.sampled_from(["[", '{"images":', '{"a":['])) * depth).encode()
    images = draw(st.one_of(st.lists(image_items, max_size=6), json_values))
    n = len(images) if isinstance(images, list) else 1
    prompts = draw(st.one_of(st.lists(st.text(max_size=10), min_size=n, max_size=n), st.lists(st.text(max_size=5)),
                             st.lists(json_values, max_size=3), json_values))
    payload = {"images": images, "prompts": prompts, **draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2))}
    if draw(st.booleans()):
        payload.pop(draw(st.sampled_from(["images", "prompts"])))
    text = json.dumps(payload, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", errors="surrogatepass") if kind == 3 else text.encode("utf-8", errors="replace")


@fuzz(500)
@given(score_bodies())
def test_fuzz_score_request_bodies(body: bytes) -> None:
    TRIED["reward-server bodies (parser)"] += 1
    try:
        images, prompts = parse_score_request(body, LIMITS)
    except RequestError as e:  # LimitError (413) is a RequestError
        assert str(e)
        return
    assert images.ndim == 4 and images.shape[0] == len(prompts) <= LIMITS.max_images
    assert all(isinstance(p, str) for p in prompts)
    if len(prompts):
        assert images.shape[1] == 3 and images.shape[2] * images.shape[3] <= LIMITS.max_pixels
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


@pytest.fixture(scope="module")
def live_server() -> Iterator[object]:
    from dpok.rewards import make_reward
    from dpok.rewards.server import RewardServer

    with RewardServer(make_reward("jpeg-compressibility"), port=0, limits=LIMITS) as server:
        yield server


@fuzz(60)
@given(body=score_bodies())
def test_fuzz_bodies_over_http(live_server, body: bytes) -> None:  # noqa: ANN001
    import http.client

    TRIED["reward-server bodies (over HTTP)"] += 1
    conn = http.client.HTTPConnection("127.0.0.1", live_server.port, timeout=30)
    try:
        conn.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
        assert status in (200, 400, 413), (status, answer)
        assert ("scores" in answer) if status == 200 else isinstance(answer.get("error"), str)
        conn.request("GET", "/health")  # and the server still serves
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ the CLI and run folders

class _ModelLoadReached(BaseException):
    """Stands in for loading the diffusion model: the settings were accepted."""


OPTION_VALUES = {
    "--rounds": st.one_of(st.integers(-2, 5).map(str), st.sampled_from(["x", "1.5", "", "1e3"])),
    "--samples-per-round": st.one_of(st.integers(-1, 17).map(str), st.just("many")),
    "--sample-batch-size": st.integers(-1, 9).map(str),
    "--learning-rate": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str), st.just("fast")),
    "--eta": st.sampled_from(["0", "1", "-1", "nan", "0.5"]),
    "--algorithm": st.sampled_from([*ALGORITHMS.names(), "ppo", ""]),
    "--advantage": st.sampled_from(["value", "group", "tracker", "best"]),
    "--step-window-end": st.sampled_from(["0", "0.5", "1", "2", "inf"]),
    "--prompt": any_prompt,
}


@st.composite
def train_argv(draw: st.DrawFn) -> tuple[list[str], bytes | None]:
    """Options of ``dpok train`` and maybe the content of a --prompt-file."""
    names = draw(st.lists(st.sampled_from(sorted(OPTION_VALUES)), max_size=5))
    argv = [part for name in names for part in (name, draw(OPTION_VALUES[name]))]
    return argv, draw(st.one_of(st.none(), prompt_file_bytes()))


@fuzz(150)
@given(train_argv())
def test_fuzz_train_command_leaves_no_partial_run_folder(tiny_reward_dir: Path, tiny_pipeline_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          drawn: tuple[list[str], bytes | None]) -> None:
    from dpok.adapter import DiffusionAdapter
    from dpok.cli import main

    TRIED["dpok train options and prompt files (no partial run folder)"] += 1
    argv, prompt_file = drawn

    def reached(*args: object, **kwargs: object) -> None:
        raise _ModelLoadReached

    monkeypatch.setattr(DiffusionAdapter, "from_pretrained", reached)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        extra = []
        if prompt_file is not None:
            (Path(folder) / "p.txt").write_bytes(prompt_file)
            extra = ["--prompt-file", str(Path(folder) / "p.txt")]
        err = io.StringIO()
        full = ["train", "--model", str(tiny_pipeline_dir), "--alignment-model", str(tiny_reward_dir),
                "--output-dir", str(out), "--device", "cpu", *argv, *extra]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(full)
            except SystemExit as e:  # argparse: a value of the wrong type, with the usage line
                code = e.code
                assert code == 2 and "error:" in err.getvalue()
            except _ModelLoadReached:
                code = None  # accepted: the model would load now
        if code is not None:
            assert code == 2 and "error:" in err.getvalue() and "Traceback" not in err.getvalue()
        assert not out.exists(), "a run folder was left behind"
