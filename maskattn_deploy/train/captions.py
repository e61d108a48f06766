"""Multi-object caption filter: keep captions that name at least two objects.

The paper trains on COCO captions that mention several objects (the authors' tooling keeps
captions with at least two spaCy noun phrases). Two counters implement the same question:

- ``heuristic`` (no dependencies): object nouns from a built-in vocabulary (the 80 COCO
  categories, their common caption synonyms, frequent scene nouns and the synthetic set's
  shapes) with simple plural handling; a plural after a number word ("two dogs") counts as two.
- ``spacy``: noun chunks from spaCy when spaCy and its English model are installed.

``auto`` uses spaCy when importable with a model, the heuristic otherwise.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Literal

from maskattn_deploy.errors import UserError

logger = logging.getLogger(__name__)

CaptionFilter = Literal["auto", "heuristic", "spacy"]
CAPTION_FILTERS: tuple[str, ...] = ("auto", "heuristic", "spacy")
SPACY_MODEL = "en_core_web_sm"

# The 80 COCO object categories (instances_*.json names).
COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Words captions use for those objects, and frequent scene objects of COCO captions.
OBJECT_SYNONYMS: tuple[str, ...] = (
    "man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady", "player", "people",
    "skier", "surfer", "skateboarder", "rider", "adult", "teenager", "crowd", "family",
    "bike", "motorbike", "plane", "jet", "airliner", "ship", "sailboat", "canoe", "kayak",
    "van", "taxi", "cab", "suv", "jeep", "tractor", "trolley", "tram", "locomotive",
    "puppy", "kitten", "pony", "calf", "lamb", "cattle", "animal", "duck", "goose", "pigeon",
    "seagull", "parrot", "chicken", "bag", "purse", "luggage", "ball", "racket", "racquet",
    "bat", "glove", "mitt", "glass", "mug", "plate", "dish", "tray", "doughnut", "sofa",
    "plant", "flower", "table", "desk", "television", "monitor", "screen", "computer",
    "phone", "fridge", "stove", "teddy", "hydrant", "sign", "light", "meter", "pole",
    "tree", "building", "house", "tower", "bridge", "fence", "wall", "window", "door", "road",
    "street", "sidewalk", "field", "beach", "ocean", "wave", "lake", "river", "mountain",
    "hill", "sky", "cloud", "grass", "rock", "snow", "water", "kitchen", "bathroom", "room",
    "counter", "shelf", "cabinet", "mirror", "lamp", "pillow", "blanket", "rug", "curtain",
    "hat", "helmet", "shirt", "jacket", "coat", "dress", "shoe", "boot", "sunglasses",
    "food", "meat", "vegetable", "fruit", "bread", "cheese", "salad", "soup", "egg", "fries",
    "tomato", "onion", "pepper", "potato", "lettuce", "donuts", "dessert", "drink", "coffee",
    "wine", "beer", "camera", "kite", "frisbee", "net", "court", "track", "platform",
    "station", "truck", "car", "fire", "balloon", "basket", "box", "container", "towel",
    "tub", "shower", "stall", "toy", "doll", "statue", "umbrella", "bench", "chair", "stool",
    "square", "circle", "triangle", "rectangle", "diamond", "star", "shape",
)  # fmt: skip

# Plurals that do not follow the -s / -es / -ies / -ves rules.
IRREGULAR_PLURALS: dict[str, str] = {
    "men": "man", "women": "woman", "people": "person", "persons": "person", "children": "child",
    "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot", "sheep": "sheep",
    "cattle": "cattle", "fries": "fries", "skis": "skis", "scissors": "scissors",
    "sunglasses": "sunglasses", "glasses": "glass", "knives": "knife", "shelves": "shelf",
    "leaves": "leaf", "loaves": "loaf", "calves": "calf", "buses": "bus", "busses": "bus",
}  # fmt: skip

# Number words that make a following plural count as several objects.
MULTIPLE_WORDS: frozenset[str] = frozenset(
    [
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "several",
        "many",
        "multiple",
        "various",
        "numerous",
        "few",
        "couple",
        "pair",
        "group",
        "bunch",
        "lot",
        "lots",
        "herd",
        "flock",
        "team",
        "both",
        "dozens",
    ]
)
_TOKEN = re.compile(r"[a-z]+")


def _plurals(word: str) -> set[str]:
    """Regular English plural forms of ``word`` (over-generating is harmless here)."""
    forms = {word + "s"}
    if word.endswith(("s", "x", "z", "ch", "sh", "o")):
        forms.add(word + "es")
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        forms.add(word[:-1] + "ies")
    if word.endswith("f"):
        forms.add(word[:-1] + "ves")
    if word.endswith("fe"):
        forms.add(word[:-2] + "ves")
    return forms


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[dict[tuple[str, ...], str], dict[tuple[str, ...], bool]]:
    """(surface phrase tokens -> lemma, surface phrase tokens -> is plural)."""
    lemma: dict[tuple[str, ...], str] = {}
    plural: dict[tuple[str, ...], bool] = {}
    for name in (*COCO_CATEGORIES, *OBJECT_SYNONYMS):
        words = tuple(name.split())
        head = words[-1]
        lemma.setdefault(words, name)
        plural.setdefault(words, False)
        for form in _plurals(head):
            key = (*words[:-1], form)
            lemma.setdefault(key, name)
            plural.setdefault(key, True)
    for form, base in IRREGULAR_PLURALS.items():
        lemma[(form,)] = base
        plural[(form,)] = form != base or base in ("sheep", "cattle", "people")
    return lemma, plural


def count_objects_heuristic(caption: str) -> int:
    """Count object mentions: distinct object nouns, a plural after a number word counts 2.

    Two-word names ("traffic light", "dining table") match before single words. A plural with no
    number word ("dogs on a beach") counts once, like a spaCy noun chunk would.
    """
    lemma, plural = _vocabulary()
    tokens = _TOKEN.findall(caption.lower())
    found: dict[str, int] = {}
    i = 0
    while i < len(tokens):
        key2 = tuple(tokens[i : i + 2])
        key = key2 if len(key2) == 2 and key2 in lemma else (tokens[i],)
        if key in lemma:
            preceding = tokens[max(0, i - 3) : i]
            several = plural[key] and any(word in MULTIPLE_WORDS for word in preceding)
            found[lemma[key]] = max(found.get(lemma[key], 0), 2 if several else 1)
        i += len(key)
    return sum(found.values())


@functools.lru_cache(maxsize=1)
def _spacy_pipeline():  # type: ignore[no-untyped-def]
    """Load spaCy's English model once; None when spaCy or the model is missing."""
    try:
        import spacy

        return spacy.load(SPACY_MODEL, disable=["ner", "textcat", "lemmatizer"])
    except (ImportError, OSError):
        return None


def count_objects_spacy(caption: str) -> int:
    """Number of spaCy noun chunks in ``caption`` (the paper's tooling counts these)."""
    nlp = _spacy_pipeline()
    if nlp is None:
        raise UserError(
            f"caption_filter='spacy' needs spaCy and its model: pip install spacy && "
            f"python -m spacy download {SPACY_MODEL} (or set data.caption_filter=heuristic)"
        )
    return sum(1 for _ in nlp(caption).noun_chunks)


def object_counter(kind: str = "auto") -> tuple[str, Callable[[str], int]]:
    """Resolve ``kind`` to (the counter actually used, the counting function)."""
    if kind not in CAPTION_FILTERS:
        raise UserError(
            f"unknown caption filter {kind!r}; choose one of {', '.join(CAPTION_FILTERS)}"
        )
    if kind == "heuristic" or (kind == "auto" and _spacy_pipeline() is None):
        if kind == "auto":
            logger.info("spaCy with %s not found: using the built-in noun heuristic", SPACY_MODEL)
        return "heuristic", count_objects_heuristic
    return "spacy", count_objects_spacy


def is_multi_object(caption: str, min_objects: int = 2, kind: str = "heuristic") -> bool:
    """True when ``caption`` names at least ``min_objects`` objects."""
    return object_counter(kind)[1](caption) >= min_objects


def filter_multi_object(
    captions: Iterable[str], min_objects: int = 2, kind: str = "auto"
) -> list[bool]:
    """Keep-flags for ``captions`` (one counter resolved for the whole list)."""
    used, count = object_counter(kind)
    if used == "spacy":  # batched parsing: much faster than one call per caption
        docs = _spacy_pipeline().pipe(list(captions), batch_size=256)
        return [sum(1 for _ in doc.noun_chunks) >= min_objects for doc in docs]
    return [count(caption) >= min_objects for caption in captions]
