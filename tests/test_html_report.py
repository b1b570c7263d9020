"""The HTML report of a run, opened from the file system in headless Chromium (selenium).

Two runs: TIA2's counting subset with the released numbers only (real leaderboard numbers), and
the same subset scored by two planted reward models on images the test draws (their colour
follows the human label, with noise), so the order of each prompt page and the disagreements can
be computed independently here from scores.parquet and the TIA2 labels. Screenshots are saved
under $HARNESS_TEST_ARTIFACTS (or a temporary folder) and their paths printed.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata
from test_cli import harness, one_line_error

from harness import RewardModel
from harness.evaluation.html_report import thumb_name
from harness.plugins import Entry, get_plugins


class Warmth(RewardModel):
    """Red minus blue of the mean colour."""

    id = "warmth"

    def preprocess(self, image):
        return np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32).mean(axis=(0, 1)) / 255

    def embed_images(self, batch):
        return np.asarray(batch)

    def score(self, features, prompts):
        return [np.full(len(p), f[0] - f[2], dtype=np.float32) for f, p in zip(features, prompts, strict=True)]


class Greenness(Warmth):
    """Green minus half the red: a worse reward, mostly unrelated to the labels."""

    id = "greenness"

    def score(self, features, prompts):
        return [np.full(len(p), f[1] - 0.5 * f[0], dtype=np.float32) for f, p in zip(features, prompts, strict=True)]


# -- runs --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    root = os.environ.get("HARNESS_TEST_ARTIFACTS")
    folder = Path(root) / "html_report" if root else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory, tia2_dir):
    out = tmp_path_factory.mktemp("reported") / "run"
    result = harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--bootstrap", 50,
                     "--out", out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tia2_dir):
    from PIL import Image, ImageDraw

    from harness_plugins.tia2 import TIA2

    root = tmp_path_factory.mktemp("scored")
    labels = TIA2(tia2_dir).load(["counting"]).images
    share = labels.groupby("prompt", sort=False)["binary"].mean()
    chosen = list(share[(share > 0.2) & (share < 0.8)].index[:4])
    rows = labels[labels["prompt"].isin(chosen)].reset_index(drop=True)
    folder = root / "images" / "counting"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, r in rows.iterrows():
        warm = float(np.clip(0.3 + 0.4 * r["graded"] + rng.normal(0, 0.2), 0, 1))
        colour = tuple(int(255 * v) for v in (warm, rng.uniform(0.2, 0.8), 1 - warm))
        img = Image.new("RGB", (96, 96), colour)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(5, 70, 2))
            draw.ellipse([x, y, x + 18, y + 18], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        img.save(folder / r["image"])
    get_plugins().reward_models.add(Entry("warmth", Warmth, "test-plugin"))
    get_plugins().reward_models.add(Entry("greenness", Greenness, "test-plugin"))
    out = root / "run"
    result = harness("leaderboard", "tia2", "--data", tia2_dir, "--subset", "counting", "--images",
                     root / "images", "--skip-missing", "--model", "warmth", "--model", "greenness",
                     "--no-cache", "--bootstrap", 50, "--no-plots", "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    return {"run": out, "root": root, "labels": rows, "prompts": chosen}


def expected(scored_run, method):
    """Per image of the scored run, computed here: position within its prompt (1 = highest score),
    percentile rank, and the border the report should give it."""
    scores = pd.read_parquet(scored_run["run"] / "scores.parquet")
    scores = scores[(scores["column"] == 0) & (scores["method"] == method)]
    frame = scores.merge(scored_run["labels"].astype({"subset": str}), on=["subset", "prompt", "image"])
    out = []
    for _, g in frame.groupby("prompt", sort=False):
        g = g.copy()
        ranks = rankdata(g["score"], method="average")
        g["pct"] = (ranks - 1) / (len(g) - 1)
        g["position"] = rankdata(-g["score"].to_numpy(), method="ordinal")
        g["border"] = np.where(g["binary"] == 1, np.where(g["pct"] > 0.5, "pos", "pos-low"),
                               np.where(g["pct"] > 0.5, "neg-high", "neg"))
        g["disagreement"] = (g["pct"] - g["graded"]).abs()
        out.append(g)
    return pd.concat(out).sort_values(["prompt", "position"]).reset_index(drop=True)


# -- the browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def open_page(driver, path):
    """Open ``path`` from the file system; the console errors it logged."""
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(Path(path).as_uri() if not str(path).startswith("file:") else str(path))
    return console_errors(driver)


def console_errors(driver):
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver, folder, name):
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(max(height, 700), 5000))
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)
    print(f"screenshot: {path}")
    return path


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def column_texts(table, col):
    from selenium.webdriver.common.by import By

    return [row.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-v")
            for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")]


# -- the leaderboard page ----------------------------------------------------------------------------
def test_leaderboard_page_sorts_by_a_clicked_column(browser, reported_run, artefacts):
    from selenium.webdriver.common.by import By

    rows = json.loads((reported_run / "leaderboard.json").read_text())
    assert open_page(browser, reported_run / "report" / "index.html") == []
    assert browser.title == "tia2 leaderboard"
    (table,) = css(browser, "table.board")
    headings = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headings == ["method", "source", "prompts", "AUROC", "AUPRC", "AP@5", "AP@10", "AP@25",
                        "Spearman", "Kendall"]
    assert column_texts(table, 0) == [r["method"] for r in rows]
    # The headline cell: the value, and its interval in smaller grey text.
    cell = table.find_elements(By.CSS_SELECTOR, "tbody tr")[0].find_elements(By.TAG_NAME, "td")[3]
    lo, hi = rows[0]["auroc_ci"]
    assert cell.text.splitlines() == [f"{rows[0]['auroc']:.4f}", f"{lo:.3f} – {hi:.3f}"]
    ci = cell.find_element(By.CLASS_NAME, "ci")
    assert ci.value_of_css_property("color") == "rgba(138, 145, 158, 1)"
    assert float(ci.value_of_css_property("font-size")[:-2]) < float(cell.value_of_css_property("font-size")[:-2])

    auroc = table.find_elements(By.CSS_SELECTOR, "thead th")[3]
    auroc.click()  # a metric sorts best first
    by_auroc = sorted(rows, key=lambda r: -r["auroc"])
    assert column_texts(table, 0) == [r["method"] for r in by_auroc]
    assert [float(v) for v in column_texts(table, 3)] == [r["auroc"] for r in by_auroc]
    assert auroc.get_attribute("aria-sort") == "descending"
    screenshot(browser, artefacts, "leaderboard")
    auroc.click()
    assert column_texts(table, 0) == [r["method"] for r in by_auroc[::-1]]
    assert auroc.get_attribute("aria-sort") == "ascending"
    table.find_elements(By.CSS_SELECTOR, "thead th")[0].click()  # text sorts A to Z
    assert column_texts(table, 0) == sorted(r["method"] for r in rows)
    assert auroc.get_attribute("aria-sort") is None

    protocol = css(browser, ".protocol")[0].text
    assert "per-prompt metrics, unweighted mean over prompts with both binary classes" in protocol
    plots = css(browser, "#plots img")
    assert plots and all(browser.execute_script("return arguments[0].naturalWidth", p) > 0 for p in plots)
    assert css(browser, "#calibration") == []  # these rows carry no calibration
    assert "no image pages" in css(browser, "#prompts")[0].text
    assert not (reported_run / "report" / "prompts").exists() and not (reported_run / "report" / "thumbs").exists()
    assert console_errors(browser) == []


def test_calibration_is_rendered_when_rows_carry_it(browser, reported_run, tmp_path, artefacts):
    from selenium.webdriver.common.by import By

    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    rows = json.loads((run / "leaderboard.json").read_text())
    rng = np.random.default_rng(3)
    calibrated = {"clip": "platt", "textnorm_ur": "textnorm", "blip2": "isotonic"}
    for r in rows:
        if r["method"] in calibrated:
            p = np.sort(rng.uniform(0, 1, 8))
            y = np.clip(p + rng.normal(0, 0.1, 8), 0, 1)
            r["ece"] = float(np.mean(np.abs(p - y)))
            r["ece_ci"] = [r["ece"] - 0.02, r["ece"] + 0.03]
            r["brier"] = float(np.mean((p - y) ** 2))
            r["brier_ci"] = [r["brier"] / 2, r["brier"] * 2]
            r["calibration"] = {"mapping": calibrated[r["method"]],
                                "bins": [[float(a), float(b), 40] for a, b in zip(p, y, strict=True)]}
        else:  # as leaderboard.json writes a row without probabilities
            r.update(ece=None, ece_ci=[None, None], brier=None, brier_ci=[None, None], calibration=None)
    (run / "leaderboard.json").write_text(json.dumps(rows))
    assert harness("report", run, "--no-plots").returncode == 0
    assert open_page(browser, run / "report" / "index.html") == []
    (table,) = css(browser, "table.board")
    headings = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert headings[-2:] == ["ECE ↓", "Brier ↓"]
    ece = table.find_elements(By.CSS_SELECTOR, "thead th")[-2]
    ece.click()  # lower is better: the first click sorts ascending; rows without ECE last
    with_ece = sorted((r for r in rows if r["ece"] is not None), key=lambda r: r["ece"])
    assert column_texts(table, 0)[:3] == [r["method"] for r in with_ece]
    assert column_texts(table, len(headings) - 2)[3:] == [""] * (len(rows) - 3)
    clip = next(r for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")
                if r.find_elements(By.TAG_NAME, "td")[0].text == "clip")
    assert clip.find_elements(By.TAG_NAME, "td")[-2].text.splitlines()[-1] == "via platt"
    (svg,) = css(browser, "#calibration svg.reliability")
    assert len(svg.find_elements(By.TAG_NAME, "circle")) == 3 * 8
    assert len(svg.find_elements(By.CSS_SELECTOR, "line.diagonal")) == 1
    legend = css(browser, "#calibration .legend")[0].text
    assert "clip (reported) · platt" in legend and "perfect calibration" in legend
    screenshot(browser, artefacts, "calibration")
    # A run that drew its reliability diagrams (plots/reliability*.png) shows those instead.
    shutil.copy(run / "plots" / "auroc.png", run / "plots" / "reliability.png")
    assert harness("report", run, "--no-plots").returncode == 0
    assert open_page(browser, run / "report" / "index.html") == []
    (img,) = css(browser, "#calibration img")
    assert img.get_attribute("src").endswith("/plots/reliability.png")
    assert browser.execute_script("return arguments[0].naturalWidth", img) > 0
    assert css(browser, "#calibration svg") == [] and len(css(browser, "#plots img")) == 7


# -- the image pages ----------------------------------------------------------------------------------
def cards_on_page(browser):
    from selenium.webdriver.common.by import By

    out = []
    for card in css(browser, "#cards figure.card"):
        out.append({"image": card.find_element(By.CLASS_NAME, "name").text,
                    "position": int(card.find_element(By.CLASS_NAME, "pos").text),
                    "border": next(c[5:] for c in card.get_attribute("class").split() if c.startswith("card-")),
                    "labels": len(card.find_elements(By.CLASS_NAME, "lab")),
                    "votes": card.find_element(By.CLASS_NAME, "votes").text,
                    "thumbs": len(card.find_elements(By.TAG_NAME, "img"))})
    return out


def test_prompt_page_orders_images_and_marks_the_labels(browser, scored_run, artefacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    report = scored_run["run"] / "report"
    assert open_page(browser, report / "index.html") == []
    first = scored_run["prompts"][0]
    links = css(browser, "#prompts table.prompts a")
    assert [a.text for a in links] == scored_run["prompts"]
    links[0].click()
    assert browser.current_url.endswith("report/prompts/counting-0001.html#method=warmth")
    assert console_errors(browser) == []
    assert css(browser, "h1.prompt")[0].text == f"“{first}”"

    want = expected(scored_run, "warmth")
    mine = want[want["prompt"] == first]
    cards = cards_on_page(browser)
    assert len(cards) == len(mine) == 50
    assert [c["image"] for c in cards] == mine["image"].tolist()
    assert [c["position"] for c in cards] == list(range(1, 51))
    assert [c["border"] for c in cards] == mine["border"].tolist()
    assert sum(c["labels"] for c in cards) == 50 and sum(c["thumbs"] for c in cards) == 50
    labels = scored_run["labels"].set_index("image")
    for c in cards[:5]:
        row = labels.loc[c["image"]]
        assert c["votes"] == f"votes {row['label_0']} · {row['label_1']} · {row['label_2']} (mean {row['graded']:.2f})"
    images = css(browser, "#cards img")
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i) > 0
               for i in images)
    red = int((mine["border"] == "neg-high").sum())
    assert len(css(browser, "#cards .card-neg-high")) == red > 0
    assert len(css(browser, "#cards .card-pos")) == int((mine["border"] == "pos").sum())
    print(f"{first}: {red} human-negative images in warmth's top half, "
          f"{int((mine['border'] == 'pos-low').sum())} positives in its bottom half")
    assert len(css(browser, ".borders li")) == 5  # the legend: a heading and four borders
    screenshot(browser, artefacts, "prompt-warmth")

    Select(browser.find_element(By.ID, "method")).select_by_value("greenness")
    green = expected(scored_run, "greenness")
    green = green[green["prompt"] == first]
    cards = cards_on_page(browser)
    assert [c["image"] for c in cards] == green["image"].tolist()
    assert [c["border"] for c in cards] == green["border"].tolist()
    assert browser.current_url.endswith("#method=greenness")
    screenshot(browser, artefacts, "prompt-greenness")
    # The chosen method follows the reader to the next prompt.
    next(a for a in css(browser, "nav.crumbs a") if a.text == "next prompt ›").click()
    assert browser.current_url.endswith("counting-0002.html#method=greenness")
    assert Select(browser.find_element(By.ID, "method")).first_selected_option.text == "greenness"
    green_next = expected(scored_run, "greenness")
    green_next = green_next[green_next["prompt"] == scored_run["prompts"][1]]
    assert [c["image"] for c in cards_on_page(browser)] == green_next["image"].tolist()
    assert console_errors(browser) == []


def test_disagreements_page(browser, scored_run, artefacts):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert open_page(browser, scored_run["run"] / "report" / "disagreements.html") == []
    for method in ("warmth", "greenness"):
        Select(browser.find_element(By.ID, "method")).select_by_value(method)
        (view,) = [s for s in css(browser, "section.method-view") if s.is_displayed()]
        assert view.get_attribute("data-method") == method
        want = expected(scored_run, method)
        high = want[want["border"] == "neg-high"].sort_values("disagreement", ascending=False, kind="stable")
        low = want[want["border"] == "pos-low"].sort_values("disagreement", ascending=False, kind="stable")
        grids = view.find_elements(By.CSS_SELECTOR, ".grid")
        shown = [[c.find_element(By.CLASS_NAME, "name").text for c in g.find_elements(By.CSS_SELECTOR, "figure")]
                 for g in grids]
        assert len(shown[0]) == min(30, len(high)) and len(shown[1]) == min(30, len(low))
        first = grids[0].find_element(By.CSS_SELECTOR, "figure")
        assert first.find_element(By.CLASS_NAME, "dis").text == f"disagreement {high['disagreement'].iloc[0]:.2f}"
        assert shown[0][0] in high[high["disagreement"] == high["disagreement"].iloc[0]]["image"].tolist()
        assert set(shown[0]) <= set(high["image"]) and set(shown[1]) <= set(low["image"])
        print(f"{method}: {len(high)} human-negative images ranked in the top half (largest disagreement "
              f"{high['disagreement'].iloc[0]:.2f}), {len(low)} positives in the bottom half")
        screenshot(browser, artefacts, f"disagreements-{method}")
    # A card links to its prompt's page, keeping the method.
    view.find_element(By.CSS_SELECTOR, "a.prompt-link").click()
    assert re.search(r"prompts/counting-\d{4}\.html#method=greenness$", browser.current_url)
    assert console_errors(browser) == []


def test_report_command_rebuilds_with_a_method_and_moved_images(scored_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(scored_run["run"], run)
    moved = tmp_path / "moved"
    shutil.copytree(scored_run["root"] / "images", moved)
    first = scored_run["prompts"][0]
    green = expected(scored_run, "greenness")
    green = green[green["prompt"] == first]
    gone = green["image"].iloc[3]
    (moved / "counting" / gone).unlink()
    result = harness("report", run, "--no-plots", "--method", "greenness", "--images", moved)
    assert result.returncode == 0, result.stderr
    page = (run / "report" / "prompts" / "counting-0001.html").read_text()
    assert re.findall(r"class='name' title='([^']+)'", page) == green["image"].tolist()
    assert page.count("class='placeholder'>image not found<") == 1
    assert f"thumbs/{thumb_name('counting', gone)}" not in page
    thumbs = {p.name for p in (run / "report" / "thumbs").iterdir()}
    assert len(thumbs) == 4 * 50 - 1 and thumb_name("counting", gone) not in thumbs
    assert all((run / "report" / "thumbs" / n).read_bytes()[:3] == b"\xff\xd8\xff" for n in list(thumbs)[:5])
    assert not [p for p in run.iterdir() if p.name.startswith(".report.")]  # swapped in whole

    one_line_error(harness("report", run, "--no-plots", "--method", "warmht"),
                   "--method 'warmht' is not a scored method of this run; choose one of warmth, greenness")
    (tmp_path / "empty").mkdir()
    one_line_error(harness("report", run, "--no-plots", "--images", tmp_path / "empty"),
                   f"--images '{tmp_path / 'empty'}' holds none of the run's 200 images")


def test_a_run_without_models_has_no_image_pages_to_choose(reported_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reported_run, run)
    one_line_error(harness("report", run, "--no-plots", "--method", "clip"),
                   "--method 'clip': this run scored no reward model, so it has no image pages")
    assert sorted(p.name for p in (run / "report").iterdir()) == ["index.html", "report.css", "report.js"]


def test_cross_benchmark_run_links_each_report(browser, tmp_path, tia2_dir, artefacts):
    from test_protocols import Released

    get_plugins().benchmarks.add(Entry("released", Released, "test-plugin"))
    out = tmp_path / "multi"
    result = harness("leaderboard", "tia2,released", "--data", tia2_dir, "--bootstrap", 20, "--no-plots",
                     "--json", "--out", out)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert open_page(browser, out / "report" / "index.html") == []
    from selenium.webdriver.common.by import By

    (table,) = css(browser, "table.board")
    heads = [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert heads[:3] == ["method", "source", "tia2/comprehensive\nAUROC"] and "released/a\nSpearman" in heads
    assert len(table.find_elements(By.CSS_SELECTOR, "tbody tr")) == len({(r["method"], r["source"]) for r in summary})
    links = css(browser, "ul.benchmarks a")
    assert [a.text for a in links] == ["tia2", "released"]
    screenshot(browser, artefacts, "cross-benchmark")
    links[1].click()
    assert browser.current_url.endswith("/multi/released/report/index.html")
    assert console_errors(browser) == [] and browser.title == "released leaderboard"
    before = (out / "report" / "index.html").read_text()
    shutil.rmtree(out / "released" / "report")
    rebuilt = harness("report", out, "--no-plots")  # a cross-benchmark run: every report and the summary
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert (out / "released" / "report" / "index.html").is_file()
    assert (out / "report" / "index.html").read_text() == before
