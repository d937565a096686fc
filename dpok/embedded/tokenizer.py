"""Build a CLIP tokenizer (byte-level BPE, ``</w>`` word ends) for the ShapeWorld vocabulary.

The files are the same format as Stable Diffusion's ``tokenizer/`` folder (``vocab.json``,
``merges.txt``), so ``CLIPTokenizer.from_pretrained`` loads them. The merges are learned by plain
BPE on the grammar's words until every word is a single token; any other text still tokenizes,
byte by byte, as with CLIP.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from ..shapeworld import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 16  # longest prompt is 8 words + BOS/EOS; 16 leaves room and keeps attention cheap


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair until each word is one token."""
    segs = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs.values()):
        pairs: Counter[tuple[str, str]] = Counter()
        for s in segs.values():
            pairs.update(zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))  # ties broken alphabetically: deterministic
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[w] = out
    return merges


def build_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write ``vocab.json`` and ``merges.txt`` to ``folder`` and return the loaded tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base]
    merges = learn_merges(vocabulary())
    tokens += ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=MODEL_MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )
    tok.save_pretrained(folder)
    return tok


def build_t5_tokenizer(folder: str | Path, model_max_length: int = MODEL_MAX_LENGTH):  # noqa: ANN201
    """A T5 tokenizer (unigram pieces, ``</s>`` appended, ``<pad>`` = 0) over the ShapeWorld words and
    letters, saved to ``folder``: what SD3's and FLUX's third text encoder reads, with no download."""
    import string

    from transformers import T5TokenizerFast

    pieces = ["<pad>", "</s>", "<unk>", "\u2581", *("\u2581" + w for w in vocabulary()), *string.ascii_lowercase]
    vocab = [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(dict.fromkeys(pieces))]
    tok = T5TokenizerFast(vocab=vocab, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                          model_max_length=model_max_length)
    tok.save_pretrained(folder)
    return tok
