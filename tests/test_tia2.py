import functools
import http.server
import json
import shutil
import threading

import numpy as np
import pytest

from harness.errors import HarnessError
from harness_plugins.tia2 import TIA2

# The AUROC table of PAPER.md: means of the authors' released per-prompt values.
PAPER_AUROC = {
    ("comprehensive", "clip"): 0.6710, ("counting", "clip"): 0.5952, ("composition", "clip"): 0.7167,
    ("comprehensive", "blip2"): 0.6825, ("counting", "blip2"): 0.5647, ("composition", "blip2"): 0.6128,
    ("comprehensive", "imagereward"): 0.7610, ("counting", "imagereward"): 0.6572,
    ("composition", "imagereward"): 0.7735,
    ("comprehensive", "pickscore"): 0.7471, ("counting", "pickscore"): 0.7305,
    ("composition", "pickscore"): 0.7848,
    ("comprehensive", "textnorm_ur"): 0.7733, ("counting", "textnorm_ur"): 0.8071,
    ("composition", "textnorm_mean"): 0.8435,
}


def test_counts(tia2_data):
    images = tia2_data.images
    assert len(images) == 27_500
    assert images.groupby(["subset", "prompt"], observed=True).ngroups == 550
    sizes = images.groupby("subset", observed=True).size().to_dict()
    assert sizes == {"comprehensive": 5000, "counting": 7500, "composition": 15000}
    labels = images[["label_0", "label_1", "label_2"]].to_numpy()
    assert labels.size == 82_500
    assert set(np.unique(labels)) <= {-1, 0, 1}
    assert (images.groupby(["subset", "prompt"], observed=True).size() == 50).all()
    both = images.groupby(["subset", "prompt"], observed=True)["binary"].agg(lambda b: 0 < b.mean() < 1)
    assert int(both.sum()) == 525
    assert both.groupby(level=0, observed=True).sum().to_dict() == {
        "comprehensive": 84, "counting": 146, "composition": 295
    }
    assert len(tia2_data.contrastive) == 550
    assert all(len(v) == 32 for (s, _), v in tia2_data.contrastive.items() if s == "composition")


def test_binary_and_graded_labels(tia2_data):
    im = tia2_data.images
    lab = im[["label_0", "label_1", "label_2"]].to_numpy()
    # Binary: at least two labels equal 1 (-1 is "not 1"); graded: mean with -1 read as 0.
    expected_binary = [(sum(x == 1 for x in row) >= 2) for row in lab.tolist()]
    assert im["binary"].astype(bool).tolist() == expected_binary
    np.testing.assert_allclose(im["graded"], (lab == 1).mean(1))
    with_minus = im[(lab == -1).any(1)]
    assert len(with_minus) > 0
    row = with_minus.iloc[0]
    labels = [row.label_0, row.label_1, row.label_2]
    assert row.graded == pytest.approx(sum(x == 1 for x in labels) / 3)


def test_eligible_prompts_are_exactly_the_released_ones(tia2_dir, tia2_data):
    bench = TIA2(tia2_dir)
    reported = bench.reported()
    im = tia2_data.images
    for subset in bench.subsets:
        share = im[im.subset == subset].groupby("prompt")["binary"].mean()
        eligible = set(share[(share > 0) & (share < 1)].index)
        assert set(reported[reported.subset == subset].prompt) == eligible
        # The released "human" field is the share of aligned images: a check on our labels.
        raw = json.loads((tia2_dir / f"alignment_scores/alignment_scores_{subset}.json").read_text())
        for prompt, values in raw.items():
            assert values["human"] == pytest.approx(share[prompt], abs=1e-9)


def test_reported_table_reproduces_the_paper(tia2_dir):
    reported = TIA2(tia2_dir).reported()
    means = reported.groupby(["subset", "method"])["auroc"].mean()
    assert len(means) == len(PAPER_AUROC)
    for key, value in PAPER_AUROC.items():
        assert round(means[key], 4) == value, key


def test_unknown_subset_suggests(tia2_dir):
    with pytest.raises(HarnessError, match="Did you mean 'counting'"):
        TIA2(tia2_dir).load(["countng"])


def test_missing_data_folder(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        TIA2(tmp_path / "nope")
    with pytest.raises(HarnessError, match="missing TIA2 file .*human_labels_counting.json"):
        TIA2(tmp_path).load(["counting"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-labels"])
def test_malformed_annotation_file(tia2_dir, tmp_path, damage):
    data = tmp_path / "tia2"
    shutil.copytree(tia2_dir, data)
    path = data / "human_annotations/human_labels_counting.json"
    path.chmod(0o644)
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x89PNG not json")
    else:
        raw = json.loads(text)
        raw["image_0_0_0.jpg"]["human_labels"] = [1, 2]
        path.write_text(json.dumps(raw))
    with pytest.raises(HarnessError, match="malformed annotation file .*human_labels_counting.json"):
        TIA2(data).load(["counting"])


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path, tia2_dir):
    """The TIA2 files behind a real HTTP server on 127.0.0.1 (a copy, so tests may damage it)."""
    root = tmp_path / "www"
    shutil.copytree(tia2_dir, root)
    for p in root.rglob("*.json"):
        p.chmod(0o644)
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_download_with_checksums_into_cache(served, tmp_path, tia2_data):
    root, url = served
    cache = tmp_path / "cache"
    bench = TIA2(base_url=url, cache=cache)
    data = bench.load(["counting"])
    assert len(data.images) == 7500
    assert (cache / "human_annotations/human_labels_counting.json").is_file()
    assert bench.checksum_mismatches == []
    expected = tia2_data.images[tia2_data.images.subset == "counting"].reset_index(drop=True)
    assert data.images["binary"].tolist() == expected["binary"].tolist()
    # A second load uses the cache: the server may be gone.
    shutil.rmtree(root / "human_annotations")
    again = TIA2(base_url=url, cache=cache).load(["counting"])
    assert len(again.images) == 7500


def test_download_checksum_mismatch_is_not_cached(served, tmp_path):
    root, url = served
    path = root / "human_annotations/human_labels_counting.json"
    path.write_text(path.read_text().replace('"caption"', '"caption" ', 1))
    cache = tmp_path / "cache"
    with pytest.raises(HarnessError, match="checksum mismatch .*human_labels_counting.json"):
        TIA2(base_url=url, cache=cache).load(["counting"])
    assert not (cache / "human_annotations/human_labels_counting.json").exists()
    assert not list((cache / "human_annotations").glob("*.tmp"))


def test_unreachable_server_names_url(tmp_path):
    with pytest.raises(HarnessError, match="could not download http://127.0.0.1:9/"):
        TIA2(base_url="http://127.0.0.1:9/", cache=tmp_path).load(["counting"])


def _make_images(root, data, subset, skip=()):
    folder = root / subset
    folder.mkdir(parents=True, exist_ok=True)
    names = data.images[data.images.subset == subset]["image"]
    for name in names:
        if name not in skip:  # resolution checks files, not their content (empty is unreadable)
            (folder / name).write_bytes(b"x")
    return len(names)


def test_resolve_images(tia2_dir, tmp_path):
    bench = TIA2(tia2_dir)
    data = bench.load(["counting"])
    n = _make_images(tmp_path, data, "counting", skip={"image_3_1_4.jpg", "image_7_0_0.jpg"})
    with pytest.raises(HarnessError, match=r"2 of 7500 TIA2 images are missing .*counting/image_3_1_4.jpg"):
        bench.resolve_images(data, tmp_path)
    resolved, missing = bench.resolve_images(data, tmp_path, skip_missing=True)
    assert sorted(missing) == ["counting/image_3_1_4.jpg", "counting/image_7_0_0.jpg"]
    assert len(resolved.images) == n - 2
    assert resolved.images["path"].str.startswith(str(tmp_path / "counting")).all()
    # A flat folder works for one subset...
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in data.images["image"]:
        (flat / name).write_bytes(b"x")
    resolved, missing = bench.resolve_images(data, flat)
    assert missing == [] and len(resolved.images) == 7500
    # ...but is ambiguous for several, since file names repeat across subsets.
    both = bench.load(["counting", "composition"])
    with pytest.raises(HarnessError, match="file names repeat across subsets"):
        bench.resolve_images(both, flat)
