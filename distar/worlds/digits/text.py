"""Prompts and a real CLIP BPE tokenizer for the digits world.

The tokenizer is transformers' `CLIPTokenizer` (the ids SD/SDXL use, 49,408 tokens) built offline from the
BPE merges file that open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), exactly as open_clip's
`SimpleTokenizer` builds its vocabulary. Prompts are text, never labels: the class is parsed back from the
text only where a model must know it (the alignment reward, the judges).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {w} = number word, {d} = numeral. The first template of each kind is used for evaluation prompts.
TEMPLATES = (
    "a handwritten digit {w}",
    "the number {d} written by hand",
    "a handwritten {d}",
    "the digit {w}",
    "a scanned digit {d}",
    "handwriting of the number {w}",
    "{d}",
    "a {w} written with a pen",
)
NULL_PROMPT = ""
MAX_LENGTH = 16  # encoding length; the tokenizer itself keeps model_max_length=77 as the pipelines expect


def prompts_for_class(k: int) -> list[str]:
    return [t.format(w=NUMBER_WORDS[k], d=k) for t in TEMPLATES]


def all_prompts() -> list[str]:
    return [p for k in range(10) for p in prompts_for_class(k)]


def eval_prompts() -> list[str]:
    """One canonical prompt per class, "a handwritten digit <word>"."""
    return [TEMPLATES[0].format(w=NUMBER_WORDS[k], d=k) for k in range(10)]


_WORD_RE = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b")
_DIGIT_RE = re.compile(r"(?<![0-9])([0-9])(?![0-9])")


def parse_digit(prompt: str) -> int:
    """The digit a prompt asks for (numeral or English word); -1 if none or ambiguous."""
    text = prompt.lower()
    found = {int(m) for m in _DIGIT_RE.findall(text)} | {NUMBER_WORDS.index(w) for w in _WORD_RE.findall(text)}
    return found.pop() if len(found) == 1 else -1


# --------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map (open_clip.tokenizer.bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe_path() -> Path:
    import open_clip

    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def _tokenizer_files() -> Path:
    """vocab.json + merges.txt derived from open_clip's BPE file, cached in the temp dir by content hash."""
    raw = _bpe_path().read_bytes()
    out = Path(tempfile.gettempdir()) / f"distar_clip_bpe_{hashlib.sha256(raw).hexdigest()[:12]}"
    if (out / "vocab.json").is_file() and (out / "merges.txt").is_file():
        return out
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1: 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    tmp = Path(tempfile.mkdtemp(prefix="distar_bpe_", dir=tempfile.gettempdir()))
    (tmp / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n", encoding="utf-8")
    try:
        os.replace(tmp, out)
    except OSError:  # another process won the race
        pass
    return out if (out / "vocab.json").is_file() else tmp


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers.CLIPTokenizer with CLIP's real BPE vocabulary (49,408 ids), model_max_length=77."""
    from transformers import CLIPTokenizer

    d = _tokenizer_files()
    return CLIPTokenizer(vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"),
                         model_max_length=77, pad_token="<|endoftext|>")


@functools.lru_cache(maxsize=4096)
def _ids(prompt: str, max_length: int):
    return clip_tokenizer()([prompt], padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="pt").input_ids[0]


def tokenize(prompts: Sequence[str], max_length: int = MAX_LENGTH):
    """input_ids [B, max_length] (BOS ... EOS, padded with EOS), as SD pipelines pad; cached per prompt."""
    import torch

    return torch.stack([_ids(p, max_length) for p in prompts])
