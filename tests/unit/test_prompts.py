"""Tests of dpok.prompts: prompt files, prompt resolution and the prompt sampler."""

from __future__ import annotations

import json

import pytest

from dpok.prompts import PromptFileError, PromptSampler, load_prompt_file, resolve_prompts
from dpok.shapeworld import PromptError, prompt_sets
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD

# --- load_prompt_file ---------------------------------------------------------------------------


def test_comments_blanks_whitespace_and_crlf(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_bytes(b"# a comment\r\n\r\n  a red circle  \r\n\t# indented comment\r\ntwo blue squares\r\n   \r\n")
    assert load_prompt_file(f, SHAPEWORLD) == ["a red circle", "two blue squares"]


def test_bom_and_unicode_text_without_grammar(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("\ufeffune théière bleue\n猫\n", encoding="utf-8")
    assert load_prompt_file(f) == ["une théière bleue", "猫"]


def test_path_with_space_unicode_and_tilde(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "my prompts ü"
    folder.mkdir()
    f = folder / "prömpts 1.txt"
    f.write_text("a red circle\n", encoding="utf-8")
    assert load_prompt_file(str(f)) == ["a red circle"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_prompt_file("~/my prompts ü/prömpts 1.txt") == ["a red circle"]


def test_missing_file(tmp_path) -> None:
    with pytest.raises(PromptFileError, match="nope.txt does not exist"):
        load_prompt_file(tmp_path / "nope.txt")


def test_directory(tmp_path) -> None:
    with pytest.raises(PromptFileError, match="is a directory"):
        load_prompt_file(tmp_path)


def test_not_utf8_names_line(tmp_path) -> None:
    f = tmp_path / "latin1.txt"
    f.write_bytes("a red circle\n# ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError) as info:
        load_prompt_file(f)
    message = str(info.value)
    assert str(f) in message and "not UTF-8" in message and "line 3" in message


@pytest.mark.parametrize("content", ["", "\n\n   \n", "# only\n# comments\n"])
def test_empty(tmp_path, content: str) -> None:
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(PromptFileError, match="has no prompts"):
        load_prompt_file(f)


def test_grammar_error_names_file_and_line(tmp_path) -> None:
    f = tmp_path / "bad prompts.txt"
    f.write_text("# header\na red circle\na red dog\nfive cats\n")
    with pytest.raises(PromptFileError) as info:
        load_prompt_file(f, SHAPEWORLD)
    message = str(info.value)
    assert str(f) in message and "line 3" in message and "'a red dog'" in message
    assert "lines 4" in message  # the other bad line is reported too
    assert isinstance(info.value.__cause__, PromptError)
    assert load_prompt_file(f) == ["a red circle", "a red dog", "five cats"]  # no grammar: any text


def test_a_domain_must_be_a_domain(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("x\n")
    with pytest.raises(ValueError, match="must be a dpok Domain"):
        load_prompt_file(f, "english")


# --- resolve_prompts ----------------------------------------------------------------------------


def test_resolve_union_order_and_dedup(tmp_path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("two blue squares\na red circle\na green triangle\n")
    got = resolve_prompts(["a red circle"], str(f), "hard", SHAPEWORLD)
    hard = prompt_sets()["hard"]
    assert got[:3] == ["a red circle", "two blue squares", "a green triangle"]
    assert got == list(dict.fromkeys(["a red circle", "two blue squares", "a red circle", "a green triangle", *hard]))
    assert len(got) == len(set(got))


def test_resolve_errors() -> None:
    with pytest.raises(ValueError, match="no prompts given"):
        resolve_prompts(None, None, None)
    with pytest.raises(ValueError, match="no prompts given"):
        resolve_prompts([], None, None)
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*common.*hard"):
        resolve_prompts(None, None, "nope", SHAPEWORLD)
    with pytest.raises(ValueError, match="unknown prompt set 'nope'.*no named prompt sets"):
        resolve_prompts(None, None, "nope")
    with pytest.raises(PromptError, match="'a red dog'"):
        resolve_prompts(["a red circle", "a red dog"], None, None, SHAPEWORLD)
    assert resolve_prompts(["a red dog"], None, None) == ["a red dog"]  # no grammar check


def test_resolve_propagates_file_errors(tmp_path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        resolve_prompts(["a red circle"], tmp_path / "missing.txt", None)


# --- PromptSampler ------------------------------------------------------------------------------


def test_sampler_is_deterministic_and_uniform() -> None:
    prompts = ["a", "b", "c", "d"]
    a, b = PromptSampler(prompts, seed=3), PromptSampler(prompts, seed=3)
    draws = a.sample(2000)
    assert draws == b.sample(2000)
    assert PromptSampler(prompts, seed=4).sample(50) != draws[:50]
    counts = {p: draws.count(p) for p in prompts}
    assert all(400 < c < 600 for c in counts.values()), counts
    assert a.sample(0) == []


def test_sampler_state_round_trip_through_json() -> None:
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    original = PromptSampler(prompts, seed=0)
    original.sample(7)
    state = json.loads(json.dumps(original.state_dict()))
    expected = original.sample(20)
    resumed = PromptSampler(prompts, seed=123)
    resumed.load_state_dict(state)
    assert resumed.sample(20) == expected
    with pytest.raises(ValueError, match="different prompts"):
        PromptSampler(prompts[:2], seed=0).load_state_dict(state)
