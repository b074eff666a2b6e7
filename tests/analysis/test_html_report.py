"""``qstar report``: the HTML page of a run, checked against the run's files and in a real headless Chromium.

The browser tests skip where Chromium is absent, except in CI (``CI`` set), where they fail instead.
"""

import base64
import itertools
import json
import os
import re
import shutil
import weakref
from html.parser import HTMLParser
from io import BytesIO

import numpy as np
import orjson
import pytest
from typer.testing import CliRunner

from qstar_cli.analysis.html_report import (
    Candidate,
    SampleSelection,
    build_report,
    token_pieces,
)
from qstar_cli.analysis.statistics import analyze_sidecar, weight_records
from qstar_cli.cli import app
from qstar_cli.runfiles.writer import SEQUENCE_SUMS, SUMMARY_FIELDS
from tests import browser
from tests.helpers import tiny_generate_args, write_prompts

PROMPTS = [{"prompt": f"Tell me about the number {i}."} for i in range(9)]
# Text that must not end the page's JSON block nor run as markup, and a URL that is text, not a reference.
PROMPTS.append({"prompt": "Explain </script><script>alert(1)</script> and <!-- http://example.com --> h\u00e9llo \u2713"})
COMPARED = ("alpha", "kl_theta", "kl_t", "logp_theta", "logp_t", "logp_q")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def lines(path):
    return [orjson.loads(line) for line in open(path, "rb")]


def page_data(page):
    """The JSON block of a page, as the page's script reads it."""
    text = page.read_text(encoding="utf-8")
    [block] = re.findall(r'<script type="application/json" id="qstar-data">(.*?)</script>', text, flags=re.DOTALL)
    return json.loads(block)


def unpack(view, name):
    """A per-token array of a page's sample, as the page's script reads it."""
    return np.frombuffer(
        base64.b64decode(view["values"][name]), dtype="<" + {"float32": "f4", "float64": "f8"}[view["dtypes"][name]]
    ).astype(np.float64)


def copy_run(src, dst_dir, **config_changes):
    """The three files of a run under another name, with manifest settings changed."""
    dst = dst_dir / "copy.jsonl"
    shutil.copy(src, dst)
    shutil.copy(src.with_name(src.stem + ".diagnostics.jsonl"), dst_dir / "copy.diagnostics.jsonl")
    meta = json.loads(src.with_name(src.stem + ".meta.json").read_text())
    meta["config"].update(config_changes)
    (dst_dir / "copy.meta.json").write_text(json.dumps(meta))
    return dst


@pytest.fixture(scope="module")
def runs(tiny_model_dirs, tmp_path_factory):
    """Main files of two tiny-model runs of the same prompts: diagnostics full and summary."""
    root = tmp_path_factory.mktemp("report-runs")
    common = tiny_generate_args(tiny_model_dirs, write_prompts(root, PROMPTS), 24, 5)
    for level in ("full", "summary"):
        result = invoke(*common, "--diagnostics", level, "--output", root / f"{level}.jsonl")
        assert result.exit_code == 0, result.output
    return {level: root / f"{level}.jsonl" for level in ("full", "summary")}


@pytest.fixture(scope="module")
def full_page(runs, tmp_path_factory):
    page = tmp_path_factory.mktemp("pages") / "full.html"
    result = invoke("report", runs["full"], "--output", page)
    assert result.exit_code == 0, result.output
    assert f"report: {page} (10 of 10 samples embedded" in result.stdout
    return page


def write_synthetic_run(root, tokenizer_dir, tokenizer, samples, max_tokens, seed=0):
    """A run's three files written directly (no model): random token ids, float32-valued diagnostics."""
    rng = np.random.default_rng(seed)
    eos = tokenizer.eos_token_id
    main_path = root / "synthetic.jsonl"
    with open(main_path, "wb") as main, open(root / "synthetic.diagnostics.jsonl", "wb") as side:
        for i in range(samples):
            length = int(rng.integers(4, max_tokens + 1))
            finish = "stop" if i % 3 == 0 else "length"
            ids = rng.integers(3, len(tokenizer), length)
            if finish == "stop":
                ids[-1] = eos
            values = {name: rng.random(length, dtype=np.float32).astype(np.float64) for name in SUMMARY_FIELDS}
            for name in ("logp_theta", "logp_t", "logp_q"):
                values[name] = -4 * values[name]
            if i % 5 == 1:
                values["alpha"] = rng.random(length)  # not float32 values: embedded as float64
            if i % 5 == 2:
                values["logp_t"][0] = np.nan  # written as null, as the writer does for non-finite values
            record = {"sample_idx": i, "num_tokens": length, "finish_reason": finish}
            for name, v in values.items():
                record.update({f"{name}_mean": v.mean(), f"{name}_std": v.std(), f"{name}_min": v.min(), f"{name}_max": v.max()})
            record.update({f"{name}_sum": values[name].sum() for name in SEQUENCE_SUMS})
            record["prompt_ids_theta"] = record["prompt_ids_t"] = [5, 6, 7]
            record["per_token"] = {"token_id": ids, **values}
            side.write(orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE))
            text = tokenizer.decode(ids[:-1] if finish == "stop" else ids)
            messages = [{"role": "user", "content": f"prompt {i}"}, {"role": "assistant", "content": text}]
            main.write(orjson.dumps({"messages": messages, "sample_idx": i, "finish_reason": finish}) + b"\n")
    meta = {
        "status": "complete",
        "config": {"model_theta": tokenizer_dir, "model_t": tokenizer_dir, "alpha_method": "kl_symmetry", "diagnostics": "full"},
        "counts": {"rows": samples, "samples": samples, "done": samples, "skipped": {}},
        "sessions": [{"new_tokens": 1000, "seconds": 2.0}],
    }
    (root / "synthetic.meta.json").write_text(json.dumps(meta))
    return main_path


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_page_values_are_the_sidecars(runs, full_page, tiny_tokenizer):
    main, side = lines(runs["full"]), lines(runs["full"].with_name("full.diagnostics.jsonl"))
    data = page_data(full_page)
    weights, _ = weight_records(analyze_sidecar(runs["full"].with_name("full.diagnostics.jsonl")))
    assert data["coloured"] and not data["selected"]
    assert [s["sample_idx"] for s in data["samples"]] == [r["sample_idx"] for r in side]
    for view, record, line, weight in zip(data["samples"], side, main, weights):
        per_token = record["per_token"]
        assert view["token_id"] == per_token["token_id"]
        for name in COMPARED:
            assert np.array_equal(unpack(view, name), np.array(per_token[name], dtype=np.float64), equal_nan=True), name
        assert view["response"] == line["messages"][-1]["content"]
        assert "".join(view["tokens"]) == view["response"] and view["joins"]
        stopped = record["finish_reason"] == "stop"
        assert len(view["tokens"]) == record["num_tokens"] - stopped
        assert view["end_token"] == (tiny_tokenizer.decode(per_token["token_id"][-1:]) if stopped else None)
        assert view["log_w"] == pytest.approx(record["logp_theta_sum"] - record["logp_q_sum"], abs=0)
        assert view["weight"] == pytest.approx(weight["weight"], rel=1e-12)
        assert view["prompt"] == line["messages"][:-1]
    # The float32 form is what keeps the page small: every array here takes it.
    assert all(v["dtypes"] == dict.fromkeys(COMPARED, "float32") for v in data["samples"])


def test_page_references_nothing_outside_itself(full_page):
    class References(HTMLParser):
        def __init__(self):
            super().__init__()
            self.urls, self.css, self.in_style, self.meta = [], [], False, {}

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.urls += [attrs[k] for k in ("src", "href", "action", "srcset", "poster") if k in attrs]
            self.css += [attrs["style"]] if "style" in attrs else []
            self.in_style = tag == "style"
            if tag == "meta" and "http-equiv" in attrs:
                self.meta[attrs["http-equiv"]] = attrs["content"]

        def handle_data(self, data):
            if self.in_style:
                self.css.append(data)

    parser = References()
    parser.feed(full_page.read_text(encoding="utf-8"))
    assert parser.urls and parser.css
    assert all(u.startswith("data:image/png;base64,") or re.fullmatch(r"#\w+", u) for u in parser.urls), parser.urls
    css = "\n".join(parser.css)
    assert "@import" not in css and not re.search(r"url\(|https?:|file:|//", css)
    assert parser.meta["Content-Security-Policy"].startswith("default-src 'none';")
    # The prompt's </script> and URL are data in the JSON block, not markup.
    text = full_page.read_text(encoding="utf-8")
    assert text.count("</script>") == 2 and "<script>alert" not in text


def test_token_pieces_join_across_split_characters(tiny_tokenizer):
    text = "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c ok\n\nend"
    ids = tiny_tokenizer.encode(text)
    pieces = token_pieces(tiny_tokenizer, ids)
    assert "".join(pieces) == text and len(pieces) == len(ids)
    # A character whose bytes span tokens goes whole to the token that completes it.
    assert "\u2713" in pieces and "\ufffd" not in "".join(pieces)
    # Random ids (invalid UTF-8 included) still join to the tokenizer's own decoding.
    ids = np.random.default_rng(0).integers(3, len(tiny_tokenizer), 300).tolist()
    assert "".join(token_pieces(tiny_tokenizer, ids)) == tiny_tokenizer.decode(ids)


def test_selection_is_the_extremes_and_a_uniform_draw_in_bounded_memory():
    rng = np.random.default_rng(5)
    log_w = rng.normal(size=10_000)
    log_w[::500] = np.nan  # no weight (a null sum): never an extreme
    selection = SampleSelection(400, seed=3)
    live = weakref.WeakSet()
    most = 0

    def load(i):
        candidate = Candidate(i, log_w[i], {}, {})
        live.add(candidate)
        return candidate

    for i in range(len(log_w)):
        selection.offer(i, log_w[i], lambda i=i: load(i))
        most = max(most, len(live))
    assert most <= 400 + 2 * 100  # the draw's keys and the two extremes; nothing else is held
    chosen = selection.chosen()
    order = np.argsort(log_w)[: 10_000 - 20]  # NaNs sort last
    by_why = {why: sorted(c.ordinal for w, c in chosen if w == why) for why in ("highest weight", "lowest weight", "random")}
    assert by_why["highest weight"] == sorted(order[-100:]) and by_why["lowest weight"] == sorted(order[:100])
    assert len(by_why["random"]) == 200 and not set(by_why["random"]) & (set(order[:100]) | set(order[-100:]))
    # Uniform over the stream: each tenth holds about a tenth of the draw (chi-square, 9 dof, p = 0.001).
    counts = np.histogram(by_why["random"], bins=10, range=(0, 10_000))[0]
    assert ((counts - 20) ** 2 / 20).sum() < 27.9
    assert [c.ordinal for _, c in chosen] == sorted(c.ordinal for _, c in chosen)


def test_page_of_20000_samples_stays_small(tiny_tokenizer, tokenizer_dir, tmp_path):
    main = write_synthetic_run(tmp_path, tokenizer_dir, tiny_tokenizer, samples=20_000, max_tokens=64)
    summary = build_report(main, tmp_path / "a.html")
    assert (summary.embedded, summary.samples) == (200, 20_000)
    assert summary.bytes < 1_600_000, summary.bytes  # 1.3 MB: plots 0.5 MB, 200 samples of 4 to 64 tokens
    data = page_data(summary.output)
    assert len(data["samples"]) == 200 and data["selected"]
    assert all(s["joins"] for s in data["samples"])
    side = lines(main.with_name("synthetic.diagnostics.jsonl"))
    log_w = np.array([r["logp_theta_sum"] - r["logp_q_sum"] for r in side])
    top = {s["sample_idx"] for s in data["samples"] if s["why"] == "highest weight"}
    assert top == set(np.argsort(log_w)[-50:].tolist())
    for view in data["samples"][:20]:
        assert view["token_id"] == side[view["sample_idx"]]["per_token"]["token_id"]
    assert (
        "the 50 with the highest and the 50 with the lowest sequence weights, and 100 drawn uniformly at random (seed 0)"
        in summary.output.read_text()
    )


def test_same_seed_same_page_another_seed_another_draw(tiny_tokenizer, tokenizer_dir, tmp_path):
    main = write_synthetic_run(tmp_path, tokenizer_dir, tiny_tokenizer, samples=300, max_tokens=16)
    pages = [build_report(main, tmp_path / f"{seed}-{n}.html", max_samples=40, seed=seed).output for seed, n in ((0, 0), (0, 1), (1, 0))]
    assert pages[0].read_bytes() == pages[1].read_bytes()
    drawn = [{s["sample_idx"] for s in page_data(p)["samples"] if s["why"] == "random"} for p in (pages[0], pages[2])]
    assert len(drawn[0]) == len(drawn[1]) == 20 and drawn[0] != drawn[1]


def test_summary_level_run_has_no_token_colouring_and_needs_no_tokenizer(runs, tmp_path):
    run = copy_run(runs["summary"], tmp_path, model_t=str(tmp_path / "gone"))
    summary = build_report(run, tmp_path / "summary.html")
    data = page_data(summary.output)
    assert not data["coloured"] and summary.embedded == 10
    assert all("tokens" not in s and "values" not in s for s in data["samples"])
    main = lines(run)
    assert [s["response"] for s in data["samples"]] == [r["messages"][-1]["content"] for r in main]
    assert "This run&#39;s diagnostics level is summary" in summary.output.read_text()


def test_torn_and_corrupt_sidecar_lines_leave_out_only_their_samples(runs, tmp_path):
    run = copy_run(runs["full"], tmp_path)
    side_path = tmp_path / "copy.diagnostics.jsonl"
    raw = side_path.read_bytes().splitlines(keepends=True)
    raw[3] = raw[3][:50] + b"\n"  # a corrupt line in the middle
    raw[-1] = raw[-1][: len(raw[-1]) // 2]  # a line torn by a crash
    side_path.write_bytes(b"".join(raw))
    result = invoke("report", run, "--output", tmp_path / "torn.html")
    assert result.exit_code == 0, result.output
    assert "2 unreadable sidecar line(s) skipped (line 4, 10)" in result.stderr
    data = page_data(tmp_path / "torn.html")
    main, side = lines(run), lines(runs["full"].with_name("full.diagnostics.jsonl"))
    kept = [i for i in range(10) if i not in (3, 9)]
    assert [s["sample_idx"] for s in data["samples"]] == [side[i]["sample_idx"] for i in kept]
    # Main lines stay paired with their sidecar lines after the skipped ones.
    for view, i in zip(data["samples"], kept):
        assert view["response"] == main[i]["messages"][-1]["content"] and view["token_id"] == side[i]["per_token"]["token_id"]


def test_unreachable_tokenizer_is_exit_2(runs, tiny_model_dirs, tmp_path):
    run = copy_run(runs["full"], tmp_path, model_t=str(tmp_path / "gone"))
    result = invoke("report", run)
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "pi_t's tokenizer is not reachable" in line and str(tmp_path / "gone") in line and "--tokenizer" in line
    assert not (tmp_path / "copy.report.html").exists()
    result = invoke("report", run, "--tokenizer", tiny_model_dirs[1])
    assert result.exit_code == 0 and (tmp_path / "copy.report.html").is_file()


def test_missing_files_and_bad_flags_are_exit_2(runs, tmp_path):
    for args, message in [
        ((tmp_path / "none.jsonl",), "run file not found"),
        ((runs["full"], "--max-samples", 0), "--max-samples must be positive"),
    ]:
        result = invoke("report", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    run = copy_run(runs["full"], tmp_path)
    (tmp_path / "copy.diagnostics.jsonl").unlink()
    result = invoke("report", run)
    assert result.exit_code == 2 and "diagnostics sidecar not found" in result.stderr


# --- in a real browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    reason = browser.missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser tests: {reason}")
        pytest.skip(reason)
    driver = browser.start()
    yield driver
    browser.stop(driver)


def open_page(driver, page):
    driver.get(page.as_uri())
    problems = [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]
    assert problems == []
    # Nothing was fetched: no resource entries at all.
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0


def span_colours(driver):
    script = "return [...document.querySelectorAll('.response .tok')].map(s => getComputedStyle(s).backgroundColor)"
    return [tuple(int(x) for x in re.findall(r"\d+", c)[:3]) for c in driver.execute_script(script)]


def test_page_in_chromium(driver, full_page, runs):
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(driver, full_page)
    data = page_data(full_page)
    main = lines(runs["full"])
    texts = driver.execute_script("return [...document.querySelectorAll('.sample')].map(c => c.querySelector('.response').textContent)")
    assert sorted(texts) == sorted(r["messages"][-1]["content"] for r in main)
    assert all(e.is_displayed() for e in driver.find_elements(By.CSS_SELECTOR, ".sample .response"))
    assert "</script><script>alert(1)</script>" in driver.execute_script("return document.body.textContent")

    # Colours follow the picked field: alpha diverges around 0.5, KL grows from white towards red.
    values = {name: np.concatenate([unpack(s, name) for s in data["samples"]]) for name in ("alpha", "kl_theta")}
    alpha_colours = span_colours(driver)
    assert len(alpha_colours) == len(values["alpha"])
    for alpha, (r, _, b) in zip(values["alpha"], alpha_colours):
        assert (r >= b) if alpha > 0.5 else (r <= b)
    Select(driver.find_element(By.ID, "field")).select_by_value("kl_theta")
    kl_colours = span_colours(driver)
    assert sum(a != b for a, b in zip(alpha_colours, kl_colours)) > len(kl_colours) / 2
    greens = [g for _, (_, g, _) in sorted(zip(values["kl_theta"], kl_colours))]
    assert all(a >= b for a, b in itertools.pairwise(greens)) and greens[0] > greens[-1]

    # Hovering shows the sidecar's numbers exactly.
    side = lines(runs["full"].with_name("full.diagnostics.jsonl"))
    for sample, token in [(0, 0), (4, 7), (9, 3)]:
        span = driver.find_elements(By.CSS_SELECTOR, f'.sample[data-index="{sample}"] .tok')[token]
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", span)
        ActionChains(driver).move_to_element(span).perform()
        shown = {
            row.get_attribute("data-field"): row.find_elements(By.TAG_NAME, "td")[1].text
            for row in driver.find_elements(By.CSS_SELECTOR, "#tip tr")
        }
        per_token = side[sample]["per_token"]
        for name in COMPARED:
            assert float(shown[name]) == per_token[name][token], name
        assert float(shown["log_ratio"]) == per_token["logp_theta"][token] - per_token["logp_t"][token]

    # Sorting and filtering.
    Select(driver.find_element(By.ID, "sort")).select_by_value("weight-desc")
    order = driver.execute_script("return [...document.querySelectorAll('.sample')].map(c => Number(c.dataset.index))")
    assert [data["samples"][i]["log_w"] for i in order] == sorted((s["log_w"] for s in data["samples"]), reverse=True)
    reason = data["samples"][0]["finish_reason"]
    Select(driver.find_element(By.ID, "finish")).select_by_value(reason)
    shown = [e for e in driver.find_elements(By.CSS_SELECTOR, ".sample") if e.is_displayed()]
    assert len(shown) == sum(s["finish_reason"] == reason for s in data["samples"])

    pixels = np.asarray(Image.open(BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100


def test_selected_and_summary_pages_in_chromium(driver, runs, tiny_tokenizer, tokenizer_dir, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    main = write_synthetic_run(tmp_path, tokenizer_dir, tiny_tokenizer, samples=300, max_tokens=40)
    page = build_report(main, tmp_path / "selected.html", max_samples=40).output
    open_page(driver, page)
    data = page_data(page)
    texts = driver.execute_script("return [...document.querySelectorAll('.sample .response')].map(r => r.textContent)")
    assert texts == [s["response"] for s in data["samples"]]
    ends = driver.find_elements(By.CSS_SELECTOR, ".tok.end")
    assert len(ends) == sum(s["finish_reason"] == "stop" for s in data["samples"]) > 0
    # float64 values and nulls come through: hover the first token of such samples.
    Select(driver.find_element(By.ID, "field")).select_by_value("log_ratio")
    side = lines(main.with_name("synthetic.diagnostics.jsonl"))
    wide = next(i for i, s in enumerate(data["samples"]) if s["dtypes"]["alpha"] == "float64")
    empty = next(i for i, s in enumerate(data["samples"]) if side[s["sample_idx"]]["per_token"]["logp_t"][0] is None)
    for index, name in [(wide, "alpha"), (empty, "logp_t"), (empty, "log_ratio")]:
        first = driver.find_element(By.CSS_SELECTOR, f'.sample[data-index="{index}"] .tok')
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", first)
        ActionChains(driver).move_to_element(first).perform()
        shown = driver.find_element(By.CSS_SELECTOR, f'#tip tr[data-field="{name}"] td:last-child').text
        if name == "alpha":
            assert float(shown) == side[data["samples"][index]["sample_idx"]]["per_token"]["alpha"][0]
        else:
            assert shown == "null"
    assert first.value_of_css_property("background-color") == "rgba(221, 221, 221, 1)"  # grey: no value
    Select(driver.find_element(By.ID, "why")).select_by_value("random")
    assert len([e for e in driver.find_elements(By.CSS_SELECTOR, ".sample") if e.is_displayed()]) == 20

    run = copy_run(runs["summary"], tmp_path)
    page = build_report(run, tmp_path / "summary.html").output
    open_page(driver, page)
    texts = driver.execute_script("return [...document.querySelectorAll('.sample .response')].map(r => r.textContent)")
    assert texts == [r["messages"][-1]["content"] for r in lines(run)]
    assert driver.find_element(By.ID, "why-plain").is_displayed()
    assert not driver.find_element(By.ID, "field").is_displayed() and not driver.find_elements(By.CSS_SELECTOR, ".tok")
