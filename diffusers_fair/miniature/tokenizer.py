"""A small byte-level BPE vocabulary for the miniature world, loadable as a transformers `CLIPTokenizer`.

The real CLIP vocabulary has 49,408 tokens, which would make the miniature text encoder's embedding table larger
than the rest of the model. Instead we learn BPE merges on the world's own words until every word is a single token,
keeping CLIP's byte-level alphabet (all 256 bytes, with and without the end-of-word marker `</w>`) so that any text
still tokenizes, only into more pieces.
"""

import json
import os
import re
from collections import Counter

from transformers import CLIPTokenizer

from .world import ATTRIBUTE_WORDS, OCCUPATION_NAMES, TEMPLATES

MODEL_MAX_LENGTH = 77
# Same pre-tokenisation as CLIP for the characters the world uses: words, then single punctuation marks.
_WORD_PATTERN = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")


def _bytes_to_unicode() -> dict[int, str]:
    # From openai/CLIP `simple_tokenizer.py` (also in transformers): printable stand-ins for the 256 bytes.
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def world_words() -> list[str]:
    """Every word (after CLIP-style pre-tokenisation) of every caption the miniature world can produce, sorted."""
    texts = list(TEMPLATES) + OCCUPATION_NAMES
    texts += [word for words in ATTRIBUTE_WORDS.values() for word in words.values()]
    return sorted({word for text in texts for word in _WORD_PATTERN.findall(text.lower())})


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on `words` (each counted once) until every word is one token; ties broken alphabetically."""
    pieces = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in words}
    merges = []
    while True:
        counts = Counter()
        for symbols in pieces.values():
            counts.update(zip(symbols, symbols[1:]))
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, symbols in pieces.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            pieces[word] = merged


def build_tokenizer(save_directory: str | os.PathLike) -> CLIPTokenizer:
    r"""
    Writes `vocab.json` and `merges.txt` for the miniature world into `save_directory` and returns the tokenizer.

    Args:
        save_directory (`str` or `os.PathLike`): folder to write (created if missing).

    Returns:
        `CLIPTokenizer` with `model_max_length=77`, in which every word of the world is a single token.
    """
    os.makedirs(save_directory, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    merges = learn_merges(world_words())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    vocab_file = os.path.join(save_directory, "vocab.json")
    merges_file = os.path.join(save_directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab=vocab_file, merges=merges_file, model_max_length=MODEL_MAX_LENGTH)
    tokenizer.save_pretrained(save_directory)
    return CLIPTokenizer.from_pretrained(save_directory)
