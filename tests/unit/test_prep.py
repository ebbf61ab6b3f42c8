"""`impasto prep`: crops, captions, masks, metadata; bad images are reported and skipped."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from impasto.training.data import load_dataset
from impasto.training.prep import PrepConfig, buckets, nearest_bucket, prepare


def make_source(folder):
    folder.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(folder / "red_star.png")
    Image.new("RGB", (64, 128), (30, 30, 200)).save(folder / "blue-star.jpg")
    (folder / "blue-star.txt").write_text("a tall {token} shape")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (10, 10)).save(folder / "tiny.png")
    (folder / "notes.md").write_text("ignored: not an image")
    return folder


def test_bad_images_are_listed_and_skipped_never_a_crash(tmp_path):
    report = prepare(PrepConfig(str(make_source(tmp_path / "src")), str(tmp_path / "out"), size=64))
    assert [r["source"] for r in report.kept] == ["blue-star.jpg", "red_star.png"]
    reasons = {s["file"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"corrupt.png", "empty.jpg", "tiny.png"}
    assert reasons["tiny.png"].startswith("too small") and reasons["corrupt.png"].startswith("unreadable")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["kept"] == 2 and len(saved["skipped"]) == 3


def test_captions_sidecar_filename_template_and_token(tmp_path):
    src = make_source(tmp_path / "src")
    side = prepare(PrepConfig(str(src), str(tmp_path / "a"), caption="sidecar", template="a {token} star"))
    assert [r["caption"] for r in side.kept] == ["a tall {token} shape", "a {token} star"]
    name = prepare(PrepConfig(str(src), str(tmp_path / "b"), caption="filename"))
    assert [r["caption"] for r in name.kept] == ["blue star", "red star"]
    templ = prepare(PrepConfig(str(src), str(tmp_path / "c"), caption="template", template="a {token} shape", token="sks"))
    assert {r["caption"] for r in templ.kept} == {"a sks shape"}
    # The trainer reads it back, filling {token} where it is still there.
    data = load_dataset(tmp_path / "a", resolution=64, token="<s>")
    assert [e.caption for e in data.examples] == ["a tall <s> shape", "a <s> star"]
    assert all(e.pixels.shape == (3, 64, 64) for e in data.examples)


def test_crops_and_aspect_buckets(tmp_path):
    src = make_source(tmp_path / "src")
    for mode in ("center", "random"):
        report = prepare(PrepConfig(str(src), str(tmp_path / mode), crop=mode, size=64))
        for row in report.kept:
            assert Image.open(tmp_path / mode / row["file"]).size == (64, 64)
    report = prepare(PrepConfig(str(src), str(tmp_path / "bucket"), crop="bucket", size=64))
    sizes = {row["source"]: (row["width"], row["height"]) for row in report.kept}
    assert sizes["red_star.png"][0] > sizes["red_star.png"][1]  # wide stays wide
    assert sizes["blue-star.jpg"][0] < sizes["blue-star.jpg"][1]  # tall stays tall
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in sizes.values())
    data = load_dataset(tmp_path / "bucket", resolution=64)
    assert {tuple(e.pixels.shape[1:]) for e in data.examples} == {(h, w) for w, h in sizes.values()}
    assert nearest_bucket(200, 100, buckets(64)) in buckets(64)


def test_masks_follow_their_image_and_missing_ones_are_reported(tmp_path):
    src = make_source(tmp_path / "src")
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (96, 64), 255).save(masks / "red_star.png")
    report = prepare(PrepConfig(str(src), str(tmp_path / "out"), masks=str(masks)))
    assert [r["source"] for r in report.kept] == ["red_star.png"]
    assert {s["file"]: s["reason"] for s in report.skipped}["blue-star.jpg"] == "no mask"
    data = load_dataset(tmp_path / "out", resolution=64, want_masks=True)
    assert data.examples[0].mask.shape == (1, 64, 64) and float(data.examples[0].mask.min()) == 1.0


def test_refuses_to_overwrite_and_bad_options(tmp_path):
    src = make_source(tmp_path / "src")
    prepare(PrepConfig(str(src), str(tmp_path / "out")))
    with pytest.raises(FileExistsError):
        prepare(PrepConfig(str(src), str(tmp_path / "out")))
    with pytest.raises(ValueError, match="crop"):
        prepare(PrepConfig(str(src), str(tmp_path / "x"), crop="zoom"))


def test_raw_folder_with_a_corrupt_image_is_loaded_without_it(tmp_path):
    src = make_source(tmp_path / "src")
    data = load_dataset(src, resolution=64, default_caption="a {token}", token="sks")
    assert sorted(e.source for e in data.examples) == ["blue-star.jpg", "red_star.png"]
    assert {f for f, _ in data.skipped} == {"corrupt.png", "empty.jpg", "tiny.png"}
