"""Write CLIP's BPE tokenizer files (vocab.json, merges.txt) for transformers' CLIPTokenizer.

Why this exists: there is no model hub here, and a tiny model still deserves the real CLIP
tokenizer so that prompts split exactly as they do for Stable Diffusion. CLIP's byte-pair
merge list is public and ships inside the `open_clip_torch` wheel
(`open_clip/bpe_simple_vocab_16e6.txt.gz`). The vocabulary is derived from it the way CLIP
defines it: the 256 byte symbols, the same with the end-of-word mark, one token per merge,
then the two special tokens; 49,408 in all.

Usage (once; the output is committed):
    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    python models/make_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl models/clip_tokenizer
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the 16e6 list


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def main(wheel: str, out_dir: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        text = gzip.decompress(zf.read("open_clip/bpe_simple_vocab_16e6.txt.gz")).decode("utf-8")
    merges = [tuple(line.split()) for line in text.split("\n")[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
