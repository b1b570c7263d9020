"""Image files: every PIL mode decoded as the originals do (16-bit scaled, not clipped), unreadable
entries of an images folder refused or skipped the same way by ``harness score`` and benchmark
image resolution, and decompression bombs named."""

from __future__ import annotations

import errno
import json
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import make_tiny_blip2, make_tiny_clip

from harness.errors import HarnessError
from harness.images import as_8bit, list_images, open_image, unreadable_images, unreadable_reason
from harness.testing import image_modes, write_image_modes

#: image_modes labels whose samples are wider than 8 bits: the decoder scales these.
SCALED = ("I;16", "I;16B", "I-16bit", "F-16bit")


def rgb_image(seed=0, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def original_rgb(image):
    """What transformers' image processors (the CLIP, PickScore and BLIP-2 originals) make of an
    image: ``convert_to_rgb`` (transparency onto white, else ``convert("RGB")``)."""
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True).astype(int)


def png16(path, values, colour_type):
    """Write a 16-bit PNG by hand (PIL writes 16-bit greyscale only): ``values`` uint16
    ``[H, W, C]``; colour type 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA."""
    h, w, c = values.shape
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


# -- 1. every mode --------------------------------------------------------------------------------
def test_16bit_greyscale_png_decodes_as_its_8bit_counterpart(tmp_path):
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    wide = np.vstack([np.tile(ramp, (8, 1)), rng.integers(0, 65536, (8, 256), dtype=np.uint16)])
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(wide / 257).astype(np.uint8)).save(tmp_path / "narrow.png")

    with Image.open(tmp_path / "wide.png") as raw:
        assert raw.mode == "I;16"
        clipped = np.asarray(raw.convert("RGB"), dtype=int)
    decoded = open_image(tmp_path / "wide.png")
    narrow = open_image(tmp_path / "narrow.png")
    assert decoded.mode == "L" and narrow.mode == "L" and decoded.size == (256, 16)
    diff = np.abs(np.asarray(decoded, dtype=int) - np.asarray(narrow, dtype=int))
    print(f"16-bit vs 8-bit PNG: max difference {diff.max()}; mean grey {np.mean(decoded):.1f} "
          f"(convert('RGB') alone: {clipped.mean():.1f})")
    assert diff.max() <= 1
    assert np.asarray(decoded)[0].tolist() == list(range(256))  # the ramp, value for value
    # What convert("RGB") alone makes of it, and what the harness read before: near white.
    assert clipped.mean() > 250 and abs(np.mean(decoded) - 127.5) < 5


def test_16bit_greyscale_png_with_a_transparent_value(tmp_path):
    wide = (np.arange(12 * 10).reshape(10, 12) * 500).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "t.png", transparency=1000)
    with Image.open(tmp_path / "t.png") as raw:
        assert raw.mode == "I;16" and raw.info["transparency"] == 1000
    decoded = open_image(tmp_path / "t.png")
    assert decoded.mode == "LA"
    alpha = np.asarray(decoded)[..., 1]
    assert (alpha == 0).sum() == 1 and alpha[0, 2] == 0  # 2 * 500 == 1000
    rgb = original_rgb(decoded)
    assert rgb[0, 2].tolist() == [255, 255, 255]  # composited onto white, like an 8-bit PNG
    assert rgb[0, 3].tolist() == [round(1500 / 257)] * 3


@pytest.mark.parametrize("colour_type,mode", [(2, "RGB"), (4, "RGBA"), (6, "RGBA")])
def test_16bit_colour_pngs_read_within_one_of_their_8bit_values(tmp_path, colour_type, mode):
    channels = {2: 3, 4: 2, 6: 4}[colour_type]
    values = np.random.default_rng(colour_type).integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    decoded = open_image(png16(tmp_path / "x.png", values, colour_type))
    assert decoded.mode == mode  # PIL reads these as 8-bit itself (grey + alpha as RGBA)
    expected = np.rint(values / 257)
    if colour_type == 4:  # grey, alpha -> grey, grey, grey, alpha
        expected = expected[..., [0, 0, 0, 1]]
    diff = np.abs(np.asarray(decoded, dtype=int) - expected)
    assert diff.max() <= 1


def test_every_mode_decodes_to_what_the_original_convert_path_gives(tmp_path):
    rgb = rgb_image(2)
    modes = image_modes(rgb)
    grey = modes["L"]
    assert {im.mode for im in modes.values()} >= {
        "1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "I;16", "I;16B"}
    assert "transparency" in modes["P-transparent"].info
    files = write_image_modes(rgb, tmp_path)
    assert set(files) == set(modes) - {"HSV"}
    for label, im in modes.items():
        decoded = as_8bit(im)
        got = original_rgb(decoded)
        assert got.shape == (30, 40, 3), label
        if label in SCALED:
            assert decoded.mode == "L", label
            np.testing.assert_array_equal(got, original_rgb(grey), err_msg=label)
            # ...where the convert path is plainly wrong: near white.
            assert original_rgb(im).mean() > 250, label
        else:
            assert decoded is im, label  # nothing to scale: the convert path is right
            np.testing.assert_array_equal(got, original_rgb(im), err_msg=label)
        if label in files:  # the same through a file and the one decoder
            with Image.open(files[label]) as opened:
                assert opened.mode == im.mode, label
            np.testing.assert_array_equal(original_rgb(open_image(files[label])), got,
                                          err_msg=f"{label} from {files[label].name}")
    # Transparency is composited onto white: a palette entry marked transparent included.
    p = modes["P-transparent"]
    hidden = np.asarray(p) == p.info["transparency"]
    assert hidden.any() and (original_rgb(p)[hidden] == 255).all()


def test_32bit_images_beyond_16_bits_are_stretched_and_8bit_ones_left_alone():
    ints = Image.fromarray(np.array([[-1000, 0, 99000]], dtype=np.int32))
    assert np.asarray(as_8bit(ints)).tolist() == [[0, round(1000 * 255 / 100000), 255]]
    floats = Image.fromarray(np.array([[np.nan, 0.0, 70000.0, np.inf]], dtype=np.float32))
    assert np.asarray(as_8bit(floats)).tolist() == [[0, 0, 255, 255]]
    in_range = Image.fromarray(np.array([[0.0, 12.5, 255.0]], dtype=np.float32))
    assert as_8bit(in_range) is in_range
    for mode in ("1", "L", "P", "RGB", "RGBA", "CMYK", "LAB"):
        im = Image.new(mode, (2, 2))
        assert as_8bit(im) is im


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {"clip": make_tiny_clip(root / "clip"), "blip2": make_tiny_blip2(root / "blip2")}


@pytest.mark.parametrize("name", ["clip", "blip2:mode=itc"])
def test_a_16bit_png_scores_as_its_8bit_counterpart(ckpts, tmp_path, name):
    from harness.scoring import load_reward_model, score_images

    rng = np.random.default_rng(4)
    wide = rng.integers(0, 65536, (36, 44), dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.fromarray(np.rint(wide / 257).astype(np.uint8)).save(tmp_path / "narrow.png")
    kind = name.split(":")[0]
    model = load_reward_model(f"{name}{',' if ':' in name else ':'}checkpoint={ckpts[kind]}",
                              device="cpu")
    prompts = [["a cat", "two dogs on a red car"]] * 2
    run = score_images(model, [tmp_path / "wide.png", tmp_path / "narrow.png"], prompts)
    wide_scores, narrow_scores = run.scores
    np.testing.assert_allclose(wide_scores, narrow_scores, atol=1e-6)
    # The in-memory path (preprocess on the image as PIL opens it) agrees, and the processor's
    # own convert path alone gives other numbers.
    with Image.open(tmp_path / "wide.png") as raw:
        raw.load()
    direct = model.score(model.embed_images(model.preprocess(raw)[None]), prompts[:1])[0]
    clipped = model.image_processor(images=raw, return_tensors="pt")["pixel_values"]
    old = model.score(model.embed_images(clipped), prompts[:1])[0]
    print(f"{name}: 16-bit {np.round(wide_scores, 5)}, 8-bit {np.round(narrow_scores, 5)}, "
          f"clipped {np.round(np.asarray(old, dtype=float), 5)}")
    np.testing.assert_allclose(direct, narrow_scores, atol=1e-6)
    narrow_pixels = model.preprocess(open_image(tmp_path / "narrow.png"))
    assert (clipped[0] - narrow_pixels).abs().max() > 1  # normalised units: far brighter


# -- 2. unreadable entries ------------------------------------------------------------------------
def deny(monkeypatch, opened=(), listed=()):
    """Permission errors the tests cannot make with chmod (they run as root): ``os.open`` of
    ``opened`` and ``os.scandir`` of ``listed`` fail with EACCES."""
    real_open, real_scandir = os.open, os.scandir
    opened, listed = {str(p) for p in opened}, {str(p) for p in listed}

    def fake_open(path, flags, *args, **kwargs):
        if str(path) in opened:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_scandir(path="."):
        if str(path) in listed:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)


@pytest.fixture
def messy(tmp_path, monkeypatch):
    """An images folder with every kind of unreadable entry, and what listing it should give."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.png", "b.JPG", "sub/c.png", "locked.png", "closed/e.png"]):
        (root / rel).parent.mkdir(exist_ok=True)
        rgb_image(i, (20, 16)).save(root / rel, format="PNG" if rel.endswith("png") else "JPEG")
    outside = tmp_path / "outside"
    outside.mkdir()
    rgb_image(9, (20, 16)).save(outside / "d.png")
    (root / "elsewhere").symlink_to(outside)          # a linked folder: followed
    (root / "sub" / "up").symlink_to("..")            # a link back up the tree: listed once
    (root / "spin").symlink_to("spin")                # a looping link not named like an image
    (root / "dir.png").mkdir()
    (root / "broken.png").symlink_to("nowhere.png")
    (root / "loop.png").symlink_to("loop.png")
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.jpg").write_bytes(b"not an image at all")  # only decoding can tell
    (root / "notes.txt").write_text("ignored")
    deny(monkeypatch, opened=[root / "locked.png"], listed=[root / "closed"])
    readable = sorted(str(root / r) for r in ["a.png", "b.JPG", "sub/c.png", "corrupt.jpg",
                                                "elsewhere/d.png"])
    culprits = {
        str(root / "broken.png"): "a broken symbolic link to nowhere.png",
        str(root / "closed"): "a folder that cannot be listed, permission denied",
        str(root / "dir.png"): "a folder, not an image file",
        str(root / "empty.png"): "an empty file",
        str(root / "locked.png"): "permission denied",
        str(root / "loop.png"): "a symbolic link loop",
    }
    return root, readable, culprits


@pytest.mark.timeout(60)
def test_listing_names_every_unreadable_entry_and_does_not_loop(messy):
    root, readable, culprits = messy
    found, bad = list_images(root)
    assert found == readable
    assert bad == culprits
    assert list(bad) == sorted(bad)


def harness(*args):
    from harness.cli import cli

    out = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    if out.exception is not None and not isinstance(out.exception, SystemExit):
        raise out.exception
    return out


def one_line_error(result, *parts):
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.mark.timeout(120)
def test_harness_score_refuses_or_skips_unreadable_images(messy, ckpts):
    root, readable, culprits = messy
    base = ["score", "--model", f"clip:checkpoint={ckpts['clip']}", "--images", root,
            "--prompt", "a cat", "--json", "--no-cache"]
    first = next(iter(culprits))
    line = one_line_error(harness(*base), f"cannot read '{first}': {culprits[first]}",
                          f"(and {len(culprits) - 1} more)", "--skip-missing")
    print(line)

    result = harness(*base, "--skip-missing")
    assert result.exit_code == 0, result.stderr
    scored = [r["image"] for r in json.loads(result.stdout)]
    assert scored == [p for p in readable if not p.endswith("corrupt.jpg")]
    assert f"Skipping {len(culprits)} images that cannot be read (--skip-missing):" in result.stderr
    for path, why in culprits.items():
        assert f"  {path}: {why}\n" in result.stderr
    # What only decoding finds is that image's failure, listed after the run.
    assert f"{root / 'corrupt.jpg'}: UnidentifiedImageError" in result.stderr
    assert "Traceback" not in result.stderr


def test_harness_score_pairs_and_single_files(ckpts, tmp_path):
    rgb_image(0, (20, 16)).save(tmp_path / "a.png")
    (tmp_path / "empty.png").write_bytes(b"")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,prompt\na.png,a cat\ngone.png,a dog\na.png,a bird\n")
    model = ["--model", f"clip:checkpoint={ckpts['clip']}", "--json", "--no-cache"]
    one_line_error(harness("score", "--pairs", pairs, "--images", tmp_path, *model),
                   f"cannot read '{tmp_path / 'gone.png'}': missing", "--skip-missing")
    result = harness("score", "--pairs", pairs, "--images", tmp_path, "--skip-missing", *model)
    assert result.exit_code == 0, result.stderr
    assert [(r["image"], r["prompt"]) for r in json.loads(result.stdout)] == [
        (str(tmp_path / "a.png"), "a cat"), (str(tmp_path / "a.png"), "a bird")]
    one_line_error(harness("score", "--images", tmp_path / "empty.png", "--prompt", "x", *model),
                   "an empty file", "--skip-missing")
    one_line_error(harness("score", "--images", tmp_path / "empty.png", "--prompt", "x",
                           "--skip-missing", *model), "no image of", "an empty file")


def test_benchmark_image_resolution_uses_the_same_checks(tmp_path, monkeypatch, caplog):
    import pandas as pd

    from harness.types import Benchmark, BenchmarkData

    class Tiny(Benchmark):
        id = "tiny"
        subsets = ("s",)

        def load(self, subsets=None):
            names = ["a.png", "dir.png", "broken.png", "gone.png", "loop.png", "empty.png",
                     "locked.png"]
            return BenchmarkData("tiny", pd.DataFrame({
                "subset": "s", "prompt_id": 0, "prompt": "p", "image": names,
                "binary": np.int8(1), "graded": 1.0}))

    root = tmp_path / "imgs"
    root.mkdir()
    for name in ("a.png", "locked.png"):
        rgb_image(0, (8, 8)).save(root / name)
    (root / "dir.png").mkdir()
    (root / "broken.png").symlink_to("nowhere.png")
    (root / "loop.png").symlink_to("loop.png")
    (root / "empty.png").write_bytes(b"")
    deny(monkeypatch, opened=[root / "locked.png"])
    bench = Tiny()
    data = bench.load()
    with pytest.raises(HarnessError) as info:
        bench.resolve_images(data, root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"6 of 7 images of 'tiny' are missing or cannot be read under "
                              f"'{root}': {root / 'dir.png'} (a folder, not an image file), ")
    assert message.endswith("; pass --skip-missing to score the rest")
    with caplog.at_level("WARNING", logger="harness.images"):
        resolved, missing = bench.resolve_images(data, root, skip_missing=True)
    assert resolved.images["path"].tolist() == [str(root / "a.png")]
    expected = unreadable_images(root / n for n in data.images["image"])
    assert missing == list(expected) and len(missing) == 6
    assert expected[str(root / "gone.png")] == "missing"
    assert expected[str(root / "locked.png")] == "permission denied"
    # The unreadable ones are listed (the merely missing are counted by the caller).
    warned = caplog.text
    for path, why in expected.items():
        assert (f"  {path}: {why}" in warned) == (why != "missing"), path


def test_tia2_image_resolution_names_unreadable_images(tia2_data, tia2_dir, tmp_path, caplog):
    from harness_plugins.tia2 import TIA2

    folder = tmp_path / "counting"
    folder.mkdir()
    names = tia2_data.images.loc[tia2_data.images["subset"] == "counting", "image"].tolist()
    for name in names[4:]:
        (folder / name).write_bytes(b"x")  # resolution does not decode
    (folder / names[0]).mkdir()
    (folder / names[1]).symlink_to("nowhere.jpg")
    (folder / names[2]).write_bytes(b"")
    bench = TIA2(tia2_dir)
    data = bench.load(["counting"])
    with pytest.raises(HarnessError, match=(
            rf"^4 of {len(names)} TIA2 images are missing or cannot be read under '{tmp_path}': "
            rf"counting/{names[0]} \(a folder, not an image file\), counting/{names[1]} \(a broken "
            rf"symbolic link to nowhere.jpg\), counting/{names[2]} \(an empty file\) and 1 more; "
            r"pass --skip-missing to score the rest$")):
        bench.resolve_images(data, tmp_path)
    with caplog.at_level("WARNING", logger="harness.images"):
        resolved, missing = bench.resolve_images(data, tmp_path, skip_missing=True)
    assert missing == [f"counting/{n}" for n in names[:4]]
    assert len(resolved.images) == len(names) - 4
    assert f"counting/{names[2]}: an empty file" in caplog.text
    assert f"counting/{names[3]}" not in caplog.text  # missing: counted, not listed


def test_unreadable_reason_of_a_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert unreadable_reason(tmp_path / "pipe.png") == "not a regular file"
    assert unreadable_reason(tmp_path / "nothing.png") == "missing"


# -- 3. decompression bombs -----------------------------------------------------------------------
def test_decompression_bomb_warning_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200 pixels: a warning
    paths = [tmp_path / "one.png", tmp_path / "two.png"]
    for p in paths:
        rgb_image(0).save(p)
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        for p in paths:
            assert open_image(p).size == (40, 30)
    messages = [str(w.message) for w in caught if w.category is Image.DecompressionBombWarning]
    assert messages == [f"image file '{p}': Image size (1200 pixels) exceeds limit of 1000 "
                        "pixels, could be decompression bomb DOS attack." for p in paths]
    with warnings.catch_warnings():  # a user who makes the warning an error gets the file too
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(Image.DecompressionBombWarning, match=f"image file '{paths[0]}'"):
            open_image(paths[0])


def test_decompression_bomb_is_a_per_image_failure_naming_the_file(tmp_path, ckpts):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgb_image(0, (20, 16)).save(folder / "fine.png")
    # A real bomb: 13400 x 13400 pixels (twice PIL's default limit) in a 22 kB PNG.
    Image.new("1", (13400, 13400)).save(folder / "bomb.png")
    result = harness("score", "--model", f"clip:checkpoint={ckpts['clip']}", "--images", folder,
                     "--prompt", "a cat", "--json", "--no-cache")
    assert result.exit_code == 0, result.stderr
    assert [r["image"] for r in json.loads(result.stdout)] == [str(folder / "fine.png")]
    bomb = folder / "bomb.png"
    assert (f"{bomb}: DecompressionBombError: image file '{bomb}': Image size (179560000 pixels) "
            "exceeds limit of 178956970 pixels") in result.stderr
    assert "Traceback" not in result.stderr
