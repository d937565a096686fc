"""Training prompts: prompt files, ``--prompt`` / ``--prompt-file`` / ``--prompt-set`` resolution, sampling.

A prompt file is UTF-8 text with one prompt per line; blank lines and lines starting with ``#``
are skipped and surrounding whitespace (including a Windows ``\\r``) is stripped. A ``.jsonl``
prompt file (JSON Lines, as GenEval's) holds one JSON object per line, ``{"prompt": "...", ...}``:
its other fields are the prompt's metadata, handed to rewards that take it (see
:class:`~dpok.rewards.base.PromptMetadataReward`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .domains import Domain


class PromptFileError(ValueError):
    """A prompt file that is missing, unreadable, empty or has a line outside the grammar."""


def _check_domain(domain: Domain | None) -> None:
    if domain is not None and not isinstance(domain, Domain):
        raise ValueError(f"domain must be a dpok Domain or None (any text), not {domain!r}")


def load_prompt_file(path: str | os.PathLike[str], domain: Domain | None = None) -> list[str]:
    """The prompts of a prompt file, in file order (duplicates kept).

    ``path`` may use ``~``. With a ``domain`` every prompt must be in its grammar. Raises
    :class:`PromptFileError` naming the file (and line) for every problem.
    """
    return [prompt for prompt, _ in load_prompt_records(path, domain)]


def is_jsonl(path: str | os.PathLike[str]) -> bool:
    """Whether a prompt file is JSON Lines (``.jsonl``: one ``{"prompt": ..., ...}`` object per line)."""
    return Path(os.fspath(path)).suffix.lower() == ".jsonl"


def load_prompt_records(path: str | os.PathLike[str], domain: Domain | None = None) -> list[tuple[str, dict[str, Any]]]:
    """``(prompt, metadata)`` of every prompt of a prompt file, in file order; the metadata of a
    text file's prompts is ``{}``, of a ``.jsonl`` file's the line's other fields."""
    _check_domain(domain)
    file = Path(os.path.expanduser(os.fspath(path)))
    if not file.exists():
        raise PromptFileError(
            f"prompt file {file} does not exist; give the path of a text file with one prompt per line"
        )
    if file.is_dir():
        raise PromptFileError(f"prompt file {file} is a directory; give a text file with one prompt per line")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {file}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")  # -sig: editors on Windows often start UTF-8 files with a BOM
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PromptFileError(
            f"prompt file {file} is not UTF-8 text: invalid byte at line {line} (byte offset {e.start}); "
            "save it with UTF-8 encoding"
        ) from None
    # split("\n") rather than splitlines(): line numbers then match what editors show (and the
    # byte count above), while strip() removes the "\r" of CRLF endings.
    numbered = [(n, line.strip()) for n, line in enumerate(text.split("\n"), start=1)]
    if is_jsonl(file):
        records = _json_lines(file, [(n, line) for n, line in numbered if line])
    else:
        records = [(n, p, {}) for n, p in numbered if p and not p.startswith("#")]
    if not records:
        raise PromptFileError(
            f"prompt file {file} has no prompts (blank lines and lines starting with '#' are skipped); "
            "write one prompt per line"
        )
    if domain is not None:
        _check_file_grammar(file, [(n, p) for n, p, _ in records], domain)
    return [(p, m) for _, p, m in records]


def _json_lines(file: Path, lines: list[tuple[int, str]]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line, prompt, metadata)`` of each JSON object line ``{"prompt": str, ...}``."""
    records = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"prompt file {file}, line {n}: not a JSON object ({e.msg}); a .jsonl prompt file "
                                  'holds one {"prompt": "...", ...} object per line') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise PromptFileError(f"prompt file {file}, line {n}: each line must be a JSON object with a non-empty "
                                  '"prompt" string, e.g. {"prompt": "a red circle", "tag": "colors"}')
        records.append((n, row["prompt"].strip(), {k: v for k, v in row.items() if k != "prompt"}))
    return records


def prompt_metadata(path: str | os.PathLike[str], domain: Domain | None = None) -> dict[str, dict[str, Any]]:
    """prompt -> metadata of a ``.jsonl`` prompt file (``{}`` for a text file). A prompt given on
    two lines with different metadata is an error (prompts are used once each, by text)."""
    if not is_jsonl(path):
        return {}
    table: dict[str, dict[str, Any]] = {}
    for prompt, meta in load_prompt_records(path, domain):
        if prompt in table and table[prompt] != meta:
            raise PromptFileError(f"prompt file {path}: {prompt!r} appears twice with different metadata; "
                                  "give each prompt once")
        table[prompt] = meta
    return table


def _check_file_grammar(file: Path, prompts: list[tuple[int, str]], domain: Domain) -> None:
    bad: list[tuple[int, ValueError]] = []
    for n, prompt in prompts:
        try:
            domain.check_prompt(prompt)
        except domain.prompt_error as e:
            bad.append((n, e))
    if bad:
        first_line, first_error = bad[0]
        others = f" (lines {', '.join(str(n) for n, _ in bad[1:])} are invalid too)" if len(bad) > 1 else ""
        raise PromptFileError(
            f"prompt file {file}, line {first_line}: {first_error}{others}; fix or remove these lines"
        ) from first_error


def resolve_prompts(
    prompts: Sequence[str] | None,
    prompt_file: str | os.PathLike[str] | None,
    prompt_set: str | None,
    domain: Domain | None = None,
) -> list[str]:
    """The training prompts: CLI prompts, then the file's, then the named set's, each once, first-seen order.

    Named sets are the ``domain``'s, and with a domain every prompt must be in its grammar. Raises
    ValueError when nothing is given or the set name is unknown, :class:`PromptFileError` for a bad
    file and the domain's error (a ValueError naming the prompt) for a CLI prompt outside its grammar.
    """
    _check_domain(domain)
    sets = domain.prompt_sets() if domain is not None else {}
    collected: list[str] = []
    for prompt in prompts or []:
        text = prompt.strip()
        if not text:
            raise ValueError("empty prompt given; every --prompt needs text")
        if domain is not None:
            domain.check_prompt(text)  # its error names the prompt and the grammar
        collected.append(text)
    if prompt_file is not None:
        collected.extend(load_prompt_file(prompt_file, domain))
    if prompt_set is not None:
        if prompt_set not in sets:
            valid = (f"valid sets: {', '.join(sets)}" if sets
                     else "this model has no named prompt sets (they come from its domain)")
            raise ValueError(f"unknown prompt set {prompt_set!r}; {valid}")
        collected.extend(sets[prompt_set])
    if not collected:
        named = f" (sets: {', '.join(sets)})" if sets else ""
        raise ValueError(f"no prompts given: use --prompt TEXT, --prompt-file FILE or --prompt-set NAME{named}")
    return list(dict.fromkeys(collected))


class PromptSampler:
    """Draws training prompts uniformly with replacement from a fixed list, reproducibly.

    Its state (the numpy generator's state) round-trips through JSON, so a resumed run draws the
    same prompts as an uninterrupted one.
    """

    def __init__(self, prompts: Sequence[str], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptSampler needs at least one prompt")
        self.prompts = list(prompts)
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)

    def sample(self, n: int) -> list[str]:
        """``n`` prompts drawn uniformly with replacement."""
        if n < 0:
            raise ValueError(f"cannot sample {n} prompts")
        indices = self._rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in indices]

    def sample_groups(self, n: int, k: int) -> list[str]:
        """``n / k`` prompts drawn uniformly with replacement, each repeated ``k`` times in a row (GRPO's
        groups: k samples of one prompt per round); ``k = 0`` is :meth:`sample`."""
        if k <= 0:
            return self.sample(n)
        if n % k:
            raise ValueError(f"cannot split {n} samples into groups of {k}")
        return [p for p in self.sample(n // k) for _ in range(k)]

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: the generator's state and the prompts it draws from."""
        return {"bit_generator": self._rng.bit_generator.state, "prompts": list(self.prompts), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the prompt list must be the same (else the draws would differ)."""
        if list(state.get("prompts", self.prompts)) != self.prompts:
            raise ValueError(
                "the saved prompt sampler drew from different prompts than this run's; resume with the same "
                "--prompt / --prompt-file / --prompt-set"
            )
        self._rng.bit_generator.state = state["bit_generator"]
        self.seed = int(state.get("seed", self.seed))


PromptFunction = Callable[[np.random.Generator], str | tuple[str, Mapping[str, Any]]]
"""``fn(rng) -> prompt`` or ``fn(rng) -> (prompt, metadata)``: draws one training prompt with ``rng``."""


class FunctionPromptSampler(PromptSampler):
    """Draws training prompts from a function ``fn(rng)`` returning a prompt or ``(prompt, metadata)``.

    ``rng`` is this sampler's numpy generator, saved in checkpoints: a function that draws only
    with it makes runs that resume identically. Metadata is recorded by prompt text in
    ``metadata`` (a prompt returned twice with different metadata is an error).
    """

    def __init__(self, function: PromptFunction, seed: int, metadata: dict[str, dict[str, Any]] | None = None) -> None:
        if not callable(function):
            raise ValueError(f"the prompt function is a {type(function).__name__}, not a function fn(rng) -> prompt")
        self.function = function
        self.seed = int(seed)
        self._rng = np.random.default_rng(self.seed)
        self.metadata = metadata if metadata is not None else {}
        self.prompts = []  # drawn on demand; the fixed ones (grids, evaluation) come from preview()

    def draw(self, rng: np.random.Generator) -> str:
        """One prompt from the function (its metadata recorded)."""
        out = self.function(rng)
        prompt, meta = (out, {}) if isinstance(out, str) else out if isinstance(out, tuple) and len(out) == 2 else (None, None)
        if not isinstance(prompt, str) or not prompt.strip() or not isinstance(meta, Mapping):
            raise ValueError(f"the prompt function returned {out!r}; it must return a prompt (a non-empty string) or "
                             "(prompt, metadata dict)")
        prompt = prompt.strip()
        meta = dict(meta)
        if self.metadata.get(prompt, meta) != meta:
            raise ValueError(f"the prompt function returned {prompt!r} with two different metadata; a prompt's "
                             "metadata must not change")
        self.metadata[prompt] = meta
        return prompt

    def preview(self, count: int, tries: int = 64) -> list[str]:
        """Up to ``count`` distinct prompts from a generator of its own (the same every run and resume):
        the fixed prompts of the grids and the in-training evaluation."""
        rng = np.random.default_rng([self.seed, 7919])
        found: list[str] = []
        for _ in range(tries):
            prompt = self.draw(rng)
            if prompt not in found:
                found.append(prompt)
            if len(found) == count:
                break
        return found

    def sample(self, n: int) -> list[str]:
        if n < 0:
            raise ValueError(f"cannot sample {n} prompts")
        return [self.draw(self._rng) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self._rng.bit_generator.state, "seed": self.seed, "function": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state.get("function"):
            raise ValueError("the saved prompt sampler drew from a prompt list, this run from a prompt function; "
                             "resume with the same prompts")
        self._rng.bit_generator.state = state["bit_generator"]
        self.seed = int(state.get("seed", self.seed))
