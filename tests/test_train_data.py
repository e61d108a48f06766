"""Training data: synthetic set, caption filter, COCO/manifest/folder sources, crops, stream order."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from maskattn_deploy.errors import UserError
from maskattn_deploy.train.captions import count_objects_heuristic, filter_multi_object
from maskattn_deploy.train.data import (
    EMPTY_CAPTION,
    MISSING_IMAGE,
    UNREADABLE_IMAGE,
    BatchStream,
    DataOptions,
    ImageItemLoader,
    SkipReport,
    open_source,
    parse_data_spec,
    prepare_image,
    resize_crop_geometry,
)
from maskattn_deploy.train.synthetic import COLOURS, SyntheticSource, draw_scene, make_scene

PHRASE = re.compile(r"a (\w+) (square|circle|triangle)")


def _save(path, size=(40, 30), colour=(200, 30, 30)) -> None:
    # PNG bytes whatever the suffix (COCO names are .jpg): lossless, so pixel checks are exact.
    Image.new("RGB", size, colour).save(path, format="PNG")


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_is_deterministic_and_varied():
    a, b = SyntheticSource(8, seed=3, size=64), SyntheticSource(8, seed=3, size=64)
    assert [a.caption(i) for i in range(8)] == [b.caption(i) for i in range(8)]
    assert np.array_equal(np.asarray(a.image(5)), np.asarray(b.image(5)))
    assert len({a.caption(i) for i in range(8)}) == 8
    other = SyntheticSource(8, seed=4, size=64)
    assert [a.caption(i) for i in range(8)] != [other.caption(i) for i in range(8)]


@pytest.mark.parametrize("index", range(12))
def test_synthetic_caption_matches_pixels_and_relation(index):
    size = 96
    scene = make_scene(index, seed=1, size=size)
    image = np.asarray(draw_scene(scene, size))
    phrases = PHRASE.findall(scene.caption)
    assert len(phrases) == len(scene.shapes) in (2, 3)
    by_colour = {shape.colour: shape for shape in scene.shapes}
    assert len(by_colour) == len(scene.shapes)  # colours are distinct, so captions bind them
    for colour, kind in phrases:
        shape = by_colour[colour]
        assert shape.kind == kind
        # The shape's centre pixel (inside every shape kind) has the named colour.
        x, y = int(shape.cx), int(shape.cy + shape.half * 0.3)
        assert tuple(image[y, x]) == COLOURS[colour]
    first, second = (by_colour[c] for c, _ in phrases[:2])
    if "to the left of" in scene.caption:
        assert first.cx < second.cx
    elif "to the right of" in scene.caption:
        assert first.cx > second.cx
    elif " above " in scene.caption:
        assert first.cy < second.cy
    elif " below " in scene.caption:
        assert first.cy > second.cy
    elif "from left to right" in scene.caption:
        xs = [by_colour[c].cx for c, _ in phrases]
        assert xs == sorted(xs)
    else:
        assert "from top to bottom" in scene.caption
        ys = [by_colour[c].cy for c, _ in phrases]
        assert ys == sorted(ys)


def test_synthetic_heldout_is_disjoint():
    train = SyntheticSource(64, seed=0, size=32)
    held = train.heldout(8)
    train_pixels = {np.asarray(train.image(i)).tobytes() for i in range(64)}
    assert not any(np.asarray(held.image(i)).tobytes() in train_pixels for i in range(8))


# ------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a horse on a beach.", 3),
        ("A dog.", 1),
        ("Two dogs playing in the snow", 3),  # two dogs (2) + snow
        ("A traffic light next to a stop sign", 2),  # two-word COCO names
        ("The giraffes are eating", 1),  # a plural without a number is one mention
        ("a red square to the left of a blue circle", 2),
        ("A very blurry photo", 0),
    ],
)
def test_object_counter(caption, expected):
    assert count_objects_heuristic(caption) == expected


def test_multi_object_filter_keeps_only_multi_object_captions():
    captions = ["A cat on a couch", "A cat", "Sunset", "a bus and two cars on a street"]
    assert filter_multi_object(captions, min_objects=2, kind="heuristic") == [
        True,
        False,
        False,
        True,
    ]


# ----------------------------------------------------------------------------- data specs


@pytest.mark.parametrize(
    ("spec", "kind", "args"),
    [
        ("synthetic:16", "synthetic", ("16",)),
        ("synthetic:16:7", "synthetic", ("16", "7")),
        ("coco:/d/ann.json:/d/train2017", "coco", ("/d/ann.json", "/d/train2017")),
        ("manifest:/x/m.csv", "manifest", ("/x/m.csv",)),
        ("/x/list.jsonl", "manifest", ("/x/list.jsonl",)),
        ("folder:/x/imgs", "folder", ("/x/imgs",)),
    ],
)
def test_parse_data_spec(spec, kind, args):
    parsed = parse_data_spec(spec)
    assert (parsed.kind, parsed.args) == (kind, args)


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:x", "coco:only.json", "nonsense", ""])
def test_bad_data_spec_shows_grammar(spec):
    with pytest.raises(UserError, match="bad data spec .*expected|bad data spec .*use synthetic:N"):
        parse_data_spec(spec)


# ------------------------------------------------------------------------------- sources


def _coco_folder(tmp_path):
    images = tmp_path / "train2017"
    images.mkdir()
    _save(images / "000001.jpg")
    _save(images / "000002.jpg", colour=(10, 200, 10))
    annotations = {
        "images": [
            {"id": 1, "file_name": "000001.jpg", "height": 30, "width": 40},
            {"id": 2, "file_name": "000002.jpg", "height": 30, "width": 40},
            {"id": 3, "file_name": "000003.jpg", "height": 30, "width": 40},  # file absent
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "caption": "A man riding a horse on a beach."},
            {"id": 11, "image_id": 1, "caption": "A horse."},
            {"id": 12, "image_id": 2, "caption": "  "},
            {"id": 13, "image_id": 2, "caption": "A cat sleeping on a laptop"},
            {"id": 14, "image_id": 3, "caption": "A dog chasing a frisbee in a park"},
        ],
    }
    ann = tmp_path / "annotations" / "captions_train2017.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps(annotations))
    return f"coco:{ann}:{images}"


def test_coco_layout_loads_with_multi_object_filter(tmp_path):
    spec = _coco_folder(tmp_path)
    report = SkipReport()
    every = open_source(spec, DataOptions(), report)
    assert len(every) == 4  # the blank caption is dropped at index time
    assert report.counts() == {EMPTY_CAPTION: 1}

    report = SkipReport()
    multi = open_source(
        spec, DataOptions(multi_object_only=True, caption_filter="heuristic"), report
    )
    assert [multi.caption(i) for i in range(len(multi))] == [
        "A man riding a horse on a beach.",
        "A cat sleeping on a laptop",
        "A dog chasing a frisbee in a park",
    ]
    loader = ImageItemLoader(multi, resolution=16)
    item = loader.load(1)
    assert item.pixels is not None and item.pixels.shape == (3, 16, 16)
    # Pixels of image 2 (green) normalised to [-1, 1].
    assert np.allclose(item.pixels[:, 8, 8].numpy(), np.array([10, 200, 10]) / 127.5 - 1, atol=1e-6)
    with pytest.raises(Exception) as info:
        loader.load(2)
    assert getattr(info.value, "reason", None) == MISSING_IMAGE


def test_manifest_csv_and_folder_sources(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("a cat on a mat\n")
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("image,caption\na.png,a red cat\nb.png,a blue dog\n")
    manifest = open_source(f"manifest:{csv_path}", DataOptions(), SkipReport())
    assert [manifest.caption(i) for i in range(2)] == ["a red cat", "a blue dog"]
    assert manifest.image(1).size == (40, 30)

    report = SkipReport()
    folder = open_source(str(tmp_path), DataOptions(), report)  # bare directory -> folder
    assert [folder.caption(i) for i in range(len(folder))] == ["a cat on a mat"]
    assert report.counts() == {EMPTY_CAPTION: 1}  # b.png has no .txt


def test_manifest_without_image_column_fails_clearly(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"caption": "a cat"}\n')
    with pytest.raises(UserError, match="no image column"):
        open_source(f"manifest:{path}", DataOptions(), SkipReport())


# --------------------------------------------------------------------- crop and time_ids


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        # landscape 300x200 -> shorter side 64: 96x64, centre crop left (96-64)/2 = 16
        (300, 200, (200, 300, 0, 16, 64, 64)),
        # portrait 200x500 -> 64x160, crop top (160-64)/2 = 48
        (200, 500, (500, 200, 48, 0, 64, 64)),
        # already square: no crop
        (64, 64, (64, 64, 0, 0, 64, 64)),
        # upscaled 30x20 -> 96x64, crop left 16
        (30, 20, (20, 30, 0, 16, 64, 64)),
    ],
)
def test_time_ids_for_non_square_crops(width, height, expected):
    image = Image.new("RGB", (width, height), (0, 0, 0))
    pixels, time_ids = prepare_image(image, 64, 64)
    assert time_ids == expected
    assert pixels.shape == (3, 64, 64)


def test_centre_crop_keeps_the_middle():
    # 300x200 image: left 100 px red, middle 100 px green, right 100 px blue.
    array = np.zeros((200, 300, 3), dtype=np.uint8)
    array[:, :100] = (255, 0, 0)
    array[:, 100:200] = (0, 255, 0)
    array[:, 200:] = (0, 0, 255)
    pixels, _ = prepare_image(Image.fromarray(array), 64, 64)
    centre = pixels[:, 32, 32].numpy()
    assert np.allclose(centre, [-1, 1, -1], atol=1e-6)  # green
    # Resized width 96, crop [16, 80): left edge is resized x=16 -> source x=50 (red).
    assert pixels[0, 32, 0] > 0.9 and pixels[2, 32, 63] > 0.9
    assert resize_crop_geometry(200, 300, 64, 64) == ((64, 96), (0, 16))


# --------------------------------------------------------------------------------- stream


def _keys(stream, n, size):
    return [stream.next_batch(size).keys for _ in range(n)]


def test_stream_resume_continues_the_same_order():
    loader = ImageItemLoader(SyntheticSource(7, size=16), 16)
    full = _keys(BatchStream(loader, seed=5, report=SkipReport()), 9, 2)  # crosses epochs
    first = BatchStream(loader, seed=5, report=SkipReport())
    head = _keys(first, 4, 2)
    resumed = BatchStream(loader, seed=5, report=SkipReport())
    resumed.load_state_dict(first.state_dict())
    assert head + _keys(resumed, 5, 2) == full
    # Each epoch is a permutation: the first 7 keys are all distinct.
    flat = [k for batch in full for k in batch]
    assert len(set(flat[:7])) == 7


def test_stream_shards_disjointly_across_processes():
    loader = ImageItemLoader(SyntheticSource(8, size=16), 16)
    ranks = [BatchStream(loader, 0, SkipReport(), rank=r, world=2) for r in range(2)]
    got = [set(k for b in _keys(s, 2, 2) for k in b) for s in ranks]
    assert got[0].isdisjoint(got[1]) and len(got[0] | got[1]) == 8


def test_stream_skips_bad_records_and_counts_each_once(tmp_path):
    for name in ("ok1.png", "ok2.png", "ok3.png"):
        _save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"this is not a png")
    rows = [
        {"image": "ok1.png", "caption": "a cat"},
        {"image": "corrupt.png", "caption": "a dog"},
        {"image": "missing.png", "caption": "a bird"},
        {"image": "ok2.png", "caption": ""},
        {"image": "ok3.png", "caption": "a cow"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    report = SkipReport()
    source = open_source(f"manifest:{manifest}", DataOptions(), report)
    stream = BatchStream(ImageItemLoader(source, 16), 0, report, num_workers=2)
    captions = [c for _ in range(6) for c in stream.next_batch(2).captions]  # 3 epochs
    assert set(captions) == {"a cat", "a cow"}
    assert report.counts() == {EMPTY_CAPTION: 1, MISSING_IMAGE: 1, UNREADABLE_IMAGE: 1}
    assert report.total == 3 and "3 records skipped" in report.summary()
