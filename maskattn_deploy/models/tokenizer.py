"""A small CLIP-style BPE tokenizer built deterministically at run time (no download).

No package on PyPI ships CLIP's BPE vocabulary without pulling heavy dependencies, so the
tiny model trains a byte-level BPE in CLIP's format (lower-case words, ``</w>`` end-of-word
suffix, <|startoftext|>/<|endoftext|>) on a built-in caption vocabulary with the ``tokenizers``
library, then loads it as a regular ``transformers.CLIPTokenizer``. Common caption words
(colours, shapes, the 80 COCO categories, spatial relations) are single tokens; other words
split into sub-words, so real prompts tokenize sensibly.
"""

from __future__ import annotations

import itertools
from collections import Counter

from transformers import CLIPTokenizer

from maskattn_deploy.export.spec import TEXT_TOKENS

COLOURS = [
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "grey",
    "golden",
    "silver",
]
SHAPES = [
    "square",
    "circle",
    "triangle",
    "rectangle",
    "star",
    "hexagon",
    "diamond",
    "cross",
    "ring",
    "shape",
    "shapes",
]
COCO = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic",
    "light",
    "fire",
    "hydrant",
    "stop",
    "sign",
    "parking",
    "meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports",
    "ball",
    "kite",
    "baseball",
    "bat",
    "glove",
    "skateboard",
    "surfboard",
    "tennis",
    "racket",
    "bottle",
    "wine",
    "glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot",
    "dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted",
    "plant",
    "bed",
    "dining",
    "table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell",
    "phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy",
    "hair",
    "drier",
    "toothbrush",
]
RELATIONS = [
    "left",
    "right",
    "of",
    "above",
    "below",
    "on",
    "top",
    "under",
    "next",
    "to",
    "behind",
    "in",
    "front",
    "near",
    "beside",
    "between",
    "inside",
    "outside",
    "over",
    "across",
    "along",
    "around",
]
COMMON = [
    "a",
    "an",
    "the",
    "and",
    "with",
    "is",
    "are",
    "sitting",
    "standing",
    "holding",
    "two",
    "three",
    "four",
    "several",
    "many",
    "small",
    "large",
    "big",
    "tall",
    "little",
    "tiny",
    "old",
    "young",
    "man",
    "woman",
    "child",
    "people",
    "group",
    "street",
    "room",
    "field",
    "road",
    "water",
    "sky",
    "grass",
    "snow",
    "beach",
    "city",
    "photo",
    "picture",
    "image",
    "of",
    "background",
    "wooden",
    "metal",
    "plate",
    "food",
    "its",
    "his",
    "her",
    "their",
    "it",
    "this",
    "that",
    "there",
    "at",
    "by",
    "for",
    "from",
    "into",
    "up",
    "down",
    "while",
    "looking",
    "walking",
    "riding",
    "playing",
    "eating",
    "flying",
    "parked",
    "next",
    "photograph",
    "painting",
    "realistic",
    "detailed",
    "high",
    "quality",
    "style",
    "art",
]


def _corpus() -> list[str]:
    """Deterministic training sentences; word frequencies decide which merges are learned."""
    lines = [" ".join(words) for words in (COLOURS, SHAPES, COCO, RELATIONS, COMMON)]
    for colour, shape in itertools.product(COLOURS, SHAPES):
        lines.append(f"a {colour} {shape}")
    for a, rel, b in zip(itertools.cycle(COCO), itertools.cycle(RELATIONS), reversed(COCO * 3)):
        lines.append(f"a {a} {rel} the {b}")
    return lines * 4


def byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (bytes map to themselves where printable)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    keep += list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def learn_merges(corpus: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word counts; ties go to the lexicographically smallest pair (deterministic)."""
    table = byte_alphabet()
    counts = Counter(corpus_word for line in corpus for corpus_word in line.lower().split())
    words = {}
    for word, count in counts.items():
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = {_merge(symbols, best): count for symbols, count in words.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def build_clip_tokenizer(num_merges: int = 1024) -> CLIPTokenizer:
    """Learn the BPE and return a CLIPTokenizer with SDXL's 77-token limit."""
    merges = learn_merges(_corpus(), num_merges)
    base = list(byte_alphabet().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=TEXT_TOKENS)
