"""``harness data download``: the real download path (huggingface_hub for hub files, raw GitHub
URLs for git files) against a hub stand-in on 127.0.0.1 serving files shaped like the upstream
ones; checksums, resume, unpacking, one-line errors.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import zipfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from hub_standin import HubStandin
from PIL import Image
from test_cli import harness, one_line_error
from test_preference import PICKAPIC_TEST, PICKAPIC_VALIDATION, _hpdv2_items, write_pickapic

from harness.errors import HarnessError
from harness.io import cache_dir
from harness.plugins import get_plugins
from harness.types import Benchmark
from harness_plugins.cards import download

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGEREWARD_JSON = SHARED / "benchmarks" / "imagereward_test" / "test.json"
IMAGEREWARD_SHA = "77cff6c2d0522006f52f0b637ef8302db1782b2b761e378c124a012a3c7fc58e"


def card_of(bench_id):
    return get_plugins().benchmarks.get(bench_id).card


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(monkeypatch):
    """A started hub stand-in; downloads go to it (HF_ENDPOINT, HARNESS_GIT_RAW_URL)."""
    srv = HubStandin().start()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", srv.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HARNESS_GIT_RAW_URL", f"{srv.endpoint}/raw")
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    yield srv
    srv.stop()


def _jpeg(value: int) -> bytes:
    """A 32x32 JPEG of seeded noise (so archives do not compress to nothing)."""
    pixels = np.random.default_rng(value).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def serve_hpdv2(srv, monkeypatch, pin_archive=True):
    """HPD v2's test.json and test.tar.gz (with a top folder test/, of real JPEGs) at the card's
    revision; with ``pin_archive`` the card's archive sha256 is the served archive's."""
    card = card_of("hpdv2_test")
    items = _hpdv2_items(6)
    text = json.dumps(items).encode()
    archive = _tar_gz({f"test/{p}": _jpeg(k) for k, p in enumerate(
        p for i in items for p in i["image_path"])})
    rev = card.source.revision
    srv.add_file("dataset", "zhwang/HPDv2", rev, "test.json", text)
    srv.add_file("dataset", "zhwang/HPDv2", rev, "test.tar.gz", archive, lfs=True)
    spec = card.images.source.files["archive"]
    if pin_archive:
        monkeypatch.setattr(spec, "sha256", sha(archive))
        monkeypatch.setattr(spec, "size", len(archive))
    return items, text, archive


def test_hpdv2_download_with_images_resumes_and_unpacks(hub, monkeypatch, tmp_path):
    items, text, archive = serve_hpdv2(hub, monkeypatch)
    cdn = f"/cdn/{sha(archive)}"
    hub.truncate[cdn] = [1000]  # the first GET of the archive breaks after 1,000 bytes
    dest = tmp_path / "hpd"
    out = harness("data", "download", "hpdv2_test", "--images", "--dest", dest)
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert f"{dest / 'test.json'}  sha256 {sha(text)}" in out.stdout
    assert f"Use: harness leaderboard hpdv2_test --data {dest} --images {dest / 'images'}" in out.stdout
    # Progress bars on stderr, one per file.
    assert "test.tar.gz" in out.stderr and "100%" in out.stderr
    # Resumed with a Range request from the byte it stopped at, not restarted.
    gets = [(p, r) for m, p, r in hub.requests if m == "GET" and p == cdn]
    assert gets == [(cdn, None), (cdn, "bytes=1000-")]
    assert (dest / "test.json").read_bytes() == text
    names = [p for i in items for p in i["image_path"]]
    assert all((dest / "images" / "test" / n).is_file() for n in names)
    assert not (dest / "test.tar.gz").exists()  # unpacked, then deleted
    assert not list(dest.rglob("*.partial*"))
    # The benchmark reads the folder as printed.
    bench = get_plugins().benchmarks.get("hpdv2_test")(dest)
    data = bench.load()
    resolved, missing = bench.resolve_images(data, dest / "images")
    assert missing == [] and len(resolved.images) == len(names)
    # A second run finds everything: no GET at all.
    before = len(hub.requests)
    again = harness("data", "download", "hpdv2_test", "--images", "--dest", dest, "--no-progress")
    assert again.returncode == 0, again.stderr
    assert [r for r in hub.requests[before:] if r[0] == "GET"] == []


def test_interrupted_download_resumes_on_the_next_run(hub, monkeypatch, tmp_path):
    _, _, archive = serve_hpdv2(hub, monkeypatch)
    cdn = f"/cdn/{sha(archive)}"
    monkeypatch.setattr(download, "ATTEMPTS", 2)
    hub.truncate[cdn] = [700, 700]  # both tries of the first run break
    dest = tmp_path / "hpd"
    first = harness("data", "download", "hpdv2_test", "--images", "--dest", dest, "--no-progress")
    one_line_error(first, "download of test.tar.gz interrupted")
    assert "run the command again to resume" in first.stderr
    partial = dest / "test.tar.gz.partial"
    assert partial.stat().st_size == 1400
    before = len(hub.requests)
    second = harness("data", "download", "hpdv2_test", "--images", "--dest", dest, "--no-progress")
    assert second.returncode == 0, second.stderr
    gets = [r for m, p, r in hub.requests[before:] if m == "GET" and p == cdn]
    assert gets == ["bytes=1400-"]
    assert not partial.exists() and (dest / "images" / ".test.tar.gz.sha256").read_text().strip() == sha(
        archive)


def test_hub_checksum_mismatch_saves_nothing(hub, monkeypatch, tmp_path):
    _, _, archive = serve_hpdv2(hub, monkeypatch, pin_archive=False)
    expected = card_of("hpdv2_test").images.source.files["archive"].sha256
    assert expected == "76f32e2e752ae1518e142cc3e9be3fe70a79bb556f96851c932fc72e18040217"
    dest = tmp_path / "hpd"
    out = harness("data", "download", "hpdv2_test", "--images", "--dest", dest, "--no-progress")
    one_line_error(out, "checksum mismatch for test.tar.gz")
    assert f"expected sha256 {expected}, got {sha(archive)}" in out.stderr
    assert "nothing was saved" in out.stderr
    assert (dest / "test.json").is_file()  # the annotations came first and are fine
    assert not (dest / "test.tar.gz").exists() and not list(dest.rglob("*.partial*"))
    assert not (dest / "images").exists()


def test_git_checksum_mismatch_saves_nothing(hub, tmp_path):
    card = card_of("imagereward_test")
    changed = IMAGEREWARD_JSON.read_bytes().replace(b'"ranking"', b'"ranking" ', 1)
    hub.add_raw(card.source.repo, card.source.revision, "data/test.json", changed)
    dest = tmp_path / "ir"
    out = harness("data", "download", "imagereward_test", "--dest", dest, "--no-progress")
    one_line_error(out, "checksum mismatch for test.json")
    assert f"expected sha256 {IMAGEREWARD_SHA}, got {sha(changed)}" in out.stderr
    assert not (dest / "test.json").exists() and not list(dest.glob("*.partial*"))


def test_imagereward_download_into_the_cache_then_load_offline(hub, tmp_path):
    card = card_of("imagereward_test")
    hub.add_raw(card.source.repo, card.source.revision, "data/test.json", IMAGEREWARD_JSON.read_bytes())
    out = harness("data", "download", "imagereward_test", "--no-progress")
    assert out.returncode == 0, out.stderr
    cached = cache_dir() / "benchmarks" / "imagereward_test" / "c1392c6dd0fd" / "test.json"
    assert f"{cached}  sha256 {IMAGEREWARD_SHA}" in out.stdout
    assert "--data" not in out.stdout
    hub.stop()  # no network from here on
    bench = get_plugins().benchmarks.get("imagereward_test")()
    assert len(bench.load().images) == 2720
    assert bench.files_read() == {"test.json": IMAGEREWARD_SHA}


@pytest.mark.parametrize("top", ["", "test_images/", "other/"])
def test_imagereward_images_land_under_the_card_root(hub, monkeypatch, tmp_path, caplog, top):
    card = card_of("imagereward_test")
    hub.add_raw(card.source.repo, card.source.revision, "data/test.json", IMAGEREWARD_JSON.read_bytes())
    raw = json.loads(IMAGEREWARD_JSON.read_text())
    first = raw[0]["generations"] + raw[1]["generations"]
    # With or without the top folder test_images/, the images land under it; another top
    # folder cannot be guessed: a warning names the first image that is not where it should be.
    archive = _zip({top + g: _jpeg(k) for k, g in enumerate(first)})
    source = card.images.source
    hub.add_file("model", source.repo, source.revision, "test_images.zip", archive, lfs=True)
    monkeypatch.setattr(source.files["archive"], "sha256", sha(archive))
    dest = tmp_path / "ir"
    with caplog.at_level(logging.WARNING, logger="harness.cards"):
        out = harness("data", "download", "imagereward_test", "--images", "--dest", dest,
                      "--no-progress")
    assert out.returncode == 0, out.stderr
    warned = [r.getMessage() for r in caplog.records if "layout differs" in r.getMessage()]
    if top == "other/":
        assert len(warned) == 1 and f"test_images/{first[0]} is not there" in warned[0]
        return
    assert warned == []
    assert all((dest / "images" / "test_images" / g).is_file() for g in first)
    bench = get_plugins().benchmarks.get("imagereward_test")(dest)
    data = bench.load()
    assert (dest / "images" / data.images["image"].iloc[0]).is_file()
    # The model repo was asked, at the pinned revision (no datasets/ prefix).
    assert ("HEAD", f"/THUDM/ImageReward/resolve/{source.revision}/test_images.zip", None) in hub.requests


def test_pickapic_download_keeps_images_in_the_parquet_files(hub, tmp_path, caplog):
    from harness.images import read_image_bytes

    card = card_of("pickapic_v2")
    made = tmp_path / "made"
    test, _ = write_pickapic(made, 10, 10)
    for spec in card.files.values():
        hub.add_file("dataset", card.source.repo, card.source.revision, spec.path,
                     (made / spec.name).read_bytes(), lfs=True)
    dest = tmp_path / "pick"
    with caplog.at_level(logging.WARNING, logger="harness.cards"):
        out = harness("data", "download", "pickapic_v2", "--images", "--dest", dest, "--no-progress")
    assert out.returncode == 0, out.stderr
    for name in (PICKAPIC_TEST, PICKAPIC_VALIDATION):
        assert (dest / name).read_bytes() == (made / name).read_bytes()
        assert f"{dest / name}  sha256 {sha((made / name).read_bytes())}" in out.stdout
    assert f"--data {dest} --images {dest}" in out.stdout
    assert not (dest / "images").exists()
    # sha256: null in the card: the computed digest is logged with a warning.
    assert any("gives no sha256" in r.getMessage() and sha((made / PICKAPIC_TEST).read_bytes())
               in r.getMessage() for r in caplog.records)
    data = get_plugins().benchmarks.get("pickapic_v2")(dest).load()
    ref = data.pairs["image_b"].iloc[3]
    assert read_image_bytes(dest / ref) == test.column("jpg_1")[3].as_py()


def test_offline_and_missing_files_are_one_line(hub, monkeypatch, tmp_path):
    serve_hpdv2(hub, monkeypatch)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = harness("data", "download", "hpdv2_test", "--dest", tmp_path / "a", "--no-progress")
    one_line_error(out, "HF_HUB_OFFLINE is set")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = harness("data", "download", "pickapic_v2", "--dest", tmp_path / "b", "--no-progress")
    one_line_error(out, "repository not found")  # the stand-in serves no Pick-a-Pic files
    card = card_of("pickapic_v2")
    hub.add_file("dataset", card.source.repo, card.source.revision, "README.md", b"# hi\n")
    out = harness("data", "download", "pickapic_v2", "--dest", tmp_path / "b", "--no-progress")
    one_line_error(out, f"no file {card.files['test'].path}")
    out = harness("data", "download", "tifa_v1", "--images", "--dest", tmp_path / "c")
    one_line_error(out, "the images of tifa_v1 cannot be downloaded")
    assert not (tmp_path / "c").exists()  # refused before fetching anything
    out = harness("data", "download", "hpdv2_tset")
    assert out.returncode == 2 and "hpdv2_test" in out.stderr  # did you mean


def test_tia2_download_annotations(hub, monkeypatch, tmp_path):
    from harness_plugins.tia2 import TIA2, _card

    card = _card()
    rev = card["source"]["revision"]
    for relpath in card["files"]:
        hub.add_raw("kykim0/TextNorm", rev, relpath, (SHARED / "tia2" / relpath).read_bytes())
    monkeypatch.setenv("HARNESS_TIA2_BASE_URL", f"{hub.endpoint}/raw/kykim0/TextNorm/{rev}/")
    dest = tmp_path / "tia2"
    out = harness("data", "download", "tia2", "--dest", dest)
    assert out.returncode == 0, out.stderr
    for relpath, digest in card["files"].items():
        assert f"{dest / relpath}  sha256 {digest}" in out.stdout
    assert len(TIA2(dest).load(["counting"]).images) == 7500
    one_line_error(harness("data", "download", "tia2", "--images"), "Google Drive")


def test_a_benchmark_without_downloads_says_so():
    class Local(Benchmark):
        id = "local"
        subsets = ("all",)

        def load(self, subsets=None):
            raise AssertionError

    with pytest.raises(HarnessError, match="benchmark 'local' has nothing to download"):
        Local().download(None)


def test_unpack_refuses_members_outside_the_folder(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"ok/a.jpg": b"1", "../escape.jpg": b"2"}))
    with pytest.raises(HarnessError, match=r"evil.zip has a member outside its folder \('../escape.jpg'\)"):
        download.unpack(archive, tmp_path / "images")
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "images").exists()
