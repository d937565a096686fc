"""Training prompts: prompt files, ``--prompt`` / ``--prompt-file`` / ``--prompt-set`` resolution, sampling.

A prompt file is UTF-8 text with one prompt per line; blank lines and lines starting with ``#``
are skipped and surrounding whitespace (including a Windows ``\\r``) is stripped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .shapeworld import parse_prompt, prompt_sets
from .shapeworld.grammar import PromptError

GRAMMARS = ("shapeworld",)
"""Prompt grammars that can be checked; None means "any text"."""


class PromptFileError(ValueError):
    """A prompt file that is missing, unreadable, empty or has a line outside the grammar."""


def _check_grammar(grammar: str | None) -> None:
    if grammar is not None and grammar not in GRAMMARS:
        raise ValueError(f"unknown prompt grammar {grammar!r}; use None or one of {', '.join(GRAMMARS)}")


def load_prompt_file(path: str | os.PathLike[str], grammar: str | None = None) -> list[str]:
    """The prompts of a prompt file, in file order (duplicates kept).

    ``path`` may use ``~``. With ``grammar="shapeworld"`` every prompt must parse. Raises
    :class:`PromptFileError` naming the file (and line) for every problem.
    """
    _check_grammar(grammar)
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
    prompts = [(n, p) for n, p in numbered if p and not p.startswith("#")]
    if not prompts:
        raise PromptFileError(
            f"prompt file {file} has no prompts (blank lines and lines starting with '#' are skipped); "
            "write one prompt per line"
        )
    if grammar == "shapeworld":
        _check_file_grammar(file, prompts)
    return [p for _, p in prompts]


def _check_file_grammar(file: Path, prompts: list[tuple[int, str]]) -> None:
    bad: list[tuple[int, PromptError]] = []
    for n, prompt in prompts:
        try:
            parse_prompt(prompt)
        except PromptError as e:
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
    grammar: str | None = None,
) -> list[str]:
    """The training prompts: CLI prompts, then the file's, then the named set's, each once, first-seen order.

    Raises ValueError when nothing is given or the set name is unknown, :class:`PromptFileError`
    for a bad file and :class:`~dpok.shapeworld.PromptError` for a CLI prompt outside ``grammar``.
    """
    _check_grammar(grammar)
    collected: list[str] = []
    for prompt in prompts or []:
        text = prompt.strip()
        if not text:
            raise ValueError("empty prompt given; every --prompt needs text")
        if grammar == "shapeworld":
            parse_prompt(text)  # its PromptError names the prompt and the grammar
        collected.append(text)
    if prompt_file is not None:
        collected.extend(load_prompt_file(prompt_file, grammar))
    if prompt_set is not None:
        sets = prompt_sets()
        if prompt_set not in sets:
            raise ValueError(f"unknown prompt set {prompt_set!r}; valid sets: {', '.join(sets)}")
        collected.extend(sets[prompt_set])
    if not collected:
        raise ValueError(
            "no prompts given: use --prompt TEXT, --prompt-file FILE or --prompt-set NAME "
            f"(sets: {', '.join(prompt_sets())})"
        )
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
