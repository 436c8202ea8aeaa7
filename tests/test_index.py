"""barlow index and barlow search, and POST /search through a real `bentoml serve`: the index and its
keys, a resized re-encoded copy finding its original, --key, model mismatches refused, ivf-pq recall."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import cli
from pipeline.embed.embed import embed
from pipeline.embed.index import build_index
from pipeline.embed.parts import new_meta, part_name, write_part
from pipeline.embed.search import SearchIndex
from pipeline.errors import UserError

from helpers_embed import clustered_vectors, fmnist_copy, other_model, read_rows, shared_embeddings, shared_model
from helpers_serving import served

TOKEN = "search-token"
QUERIES = (3, 77, 150, 199)  # Fashion-MNIST test images inside the 200 indexed ones


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return shared_model(tmp_path_factory)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory, model_dir, fmnist_shards):
    return shared_embeddings(tmp_path_factory, model_dir, fmnist_shards)


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, emb_dir):
    out = tmp_path_factory.mktemp("index") / "flat"
    assert cli.main(["index", str(emb_dir), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def query_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("queries")
    paths = []
    for i, index in enumerate(QUERIES):
        path = folder / f"copy-{index}.jpg"
        path.write_bytes(fmnist_copy(index, size=(56, 45, 84, 60)[i], quality=(85, 70, 95, 80)[i]))
        paths.append(path)
    return paths


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_index_records_model_dim_metric_and_every_key(index_dir, emb_dir, model_dir):
    info = json.loads((index_dir / "index.json").read_text())
    model = json.loads((model_dir / "model.json").read_text())
    assert info["model"]["sha256"] == model["onnx_sha256"] and info["model"]["name"] == model["name"]
    assert (info["dim"], info["metric"], info["kind"], info["count"]) == (512, "cosine", "flat", 200)
    keys = pq.read_table(index_dir / info["generation"] / "keys.parquet").to_pydict()
    rows = read_rows(emb_dir)
    assert {c: keys[c] for c in ("key", "source", "label")} == {c: rows[c] for c in ("key", "source", "label")}, \
        "row i is embedding i"
    assert sum(info["parts"].values()) == 200 and set(keys["part"]) == set(info["parts"])
    assert sorted(p.name for p in index_dir.iterdir()) == [info["generation"], "index.json"]
    assert sorted(p.name for p in (index_dir / info["generation"]).iterdir()) == ["index.faiss", "keys.parquet"]
    index = SearchIndex(index_dir)
    assert len(index) == 200 and np.allclose(index.reconstruct(5), rows["embedding"][5], atol=1e-6)


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_a_resized_reencoded_copy_finds_its_original_first(index_dir, model_dir, query_files, capsys):
    assert cli.main(["search", str(index_dir), "--model", str(model_dir), *map(str, query_files), "-k", "5"]) == 0
    records = json_lines(capsys.readouterr().out)
    assert len(records) == 5 * len(QUERIES)
    for path, index in zip(query_files, QUERIES):
        hits = [r for r in records if r["query"] == str(path)]
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0]["key"] == f"{index:06d}" and hits[0]["source"] == f"fashion-mnist:test/{index}"
        scores = [h["score"] for h in hits]
        assert scores[0] > 0.99 and scores == sorted(scores, reverse=True)


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_key_query_returns_its_neighbours_without_itself(index_dir, capsys):
    assert cli.main(["search", str(index_dir), "--key", "000010", "-k", "4"]) == 0
    records = json_lines(capsys.readouterr().out)
    assert len(records) == 4 and all(r["query"] == "000010" and r["key"] != "000010" for r in records)
    assert all(-1 <= r["score"] <= 1 for r in records)
    assert cli.main(["search", str(index_dir), "--key", "nope"]) == 2
    assert "not in the index" in capsys.readouterr().err


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_search_cli_errors_are_one_sentence(index_dir, model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    for argv, message in (
        ([str(index_dir), "--model", str(model_dir), str(bad)], "bad.jpg: the"),
        ([str(index_dir), "--model", str(model_dir), str(tmp_path / "missing.jpg")], "cannot read"),
        ([str(index_dir), str(bad)], "need --model"),
        ([str(index_dir), "--model", str(model_dir), str(bad), "-k", "0"], "between 1 and 1000"),
        ([str(tmp_path), "--key", "x"], "not an INDEX_DIR"),
    ):
        assert cli.main(["search", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1], (argv, err)


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_mixing_models_is_refused_with_a_clear_message(emb_dir, model_dir, index_dir, fmnist_shards, query_files,
                                                       tmp_path, capsys):
    other = other_model(model_dir, tmp_path / "other")
    single = tmp_path / "one-shard"
    single.mkdir()
    shutil.copy(fmnist_shards / "shard-000000.tar", single / "extra.tar")
    embed(other, str(single), tmp_path / "other-emb", workers=0)
    mixed = tmp_path / "mixed"
    shutil.copytree(emb_dir, mixed)
    for part in (tmp_path / "other-emb").glob("part-*.parquet"):
        shutil.copy(part, mixed)
    assert cli.main(["index", str(mixed), "--out", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert "holds embeddings of another model" in err and "other-resnet18" in err
    assert not (tmp_path / "idx" / "index.json").exists()

    assert cli.main(["search", str(index_dir), "--model", str(other), str(query_files[0])]) == 2
    assert "was built from" in capsys.readouterr().err
    from serving.search import open_index

    with pytest.raises(UserError, match="was built from"):  # the service refuses to start on such a pair
        open_index(index_dir, json.loads((other / "model.json").read_text()))


def test_ivf_pq_trains_on_a_sample_and_keeps_recall_against_flat(tmp_path):
    """Synthetic embeddings only (no exported model): runs in a few seconds."""
    vectors = clustered_vectors(10_000, 32)
    model = {"name": "synthetic", "sha256": "f" * 64, "dim": 32, "image_size": 8}
    emb = tmp_path / "emb"
    for part in range(2):
        if part == 1:  # 5,000 embeddings so far: too few to train the quantizers on
            with pytest.raises(UserError, match="needs at least 10,000"):
                build_index(emb, tmp_path / "small", kind="ivf-pq")
        rows = range(part * 5000, (part + 1) * 5000)
        sources = {f"src{i}": "v1" for i in rows}
        write_part(str(emb / part_name(f"s{part}", sources, model["sha256"])), [f"k{i}" for i in rows],
                   list(sources), [None] * 5000, vectors[rows.start:rows.stop],
                   new_meta(model, True, "file", sources, 5000, [], []))
    flat_info = build_index(emb, tmp_path / "flat")
    ivf_info = build_index(emb, tmp_path / "ivf", kind="ivf-pq")
    assert ivf_info["kind"] == "ivf-pq" and ivf_info["count"] == 10_000 and ivf_info["pq_bytes"] == 2
    assert ivf_info["nlist"] >= 16 and ivf_info["nprobe"] >= 1 and flat_info["kind"] == "flat"
    flat, ivf = SearchIndex(tmp_path / "flat"), SearchIndex(tmp_path / "ivf")
    noise = 0.05 * np.random.default_rng(2).standard_normal((200, 32)).astype(np.float32)
    queries = vectors[::50] + noise  # near indexed points, not on them
    exact = [{h["key"] for h in hits} for hits in flat.search(queries, 10)]
    approx = [{h["key"] for h in hits} for hits in ivf.search(queries, 10)]
    recall = np.mean([len(a & e) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.85, recall  # PQ codes alone gave ~0.5 here; chance is 0.001 (bench/ measures real sizes)
    near = ivf.neighbours_of_key("k120", 5)
    assert len(near) == 5 and all(h["key"] != "k120" for h in near)


@pytest.fixture(scope="module")
def server(model_dir, index_dir, tmp_path_factory):
    """A real `bentoml serve` of the shared model with its index, behind a token (the page's tests use it too)."""
    yield from served(model_dir, tmp_path_factory.mktemp("search-server"), index_dir, BARLOW_API_TOKEN=TOKEN,
                      BARLOW_MAX_IMAGES="4")


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60) as client:
        yield client


@pytest.mark.slow  # the exported model and its embeddings (~30 s once per session)
def test_search_endpoint_through_a_real_server(server, http, query_files):
    files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in query_files]
    response = http.post("/search", files=files, data={"k": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 3 and len(body["results"]) == len(QUERIES)
    for result, index in zip(body["results"], QUERIES):
        hits = result["neighbours"]
        assert len(hits) == 3 and hits[0]["key"] == f"{index:06d}" and hits[0]["score"] > 0.99
    single = http.post("/search?k=1", files=files[:1])
    assert single.status_code == 200 and len(single.json()["results"][0]["neighbours"]) == 1

    def rejected(status: int, *args, **kwargs) -> str:
        reply = http.post("/search", *args, **kwargs)
        assert reply.status_code == status, reply.text
        return reply.json()["error"]

    assert "k must be an integer from 1 to 1000" in rejected(422, files=files[:1], data={"k": "0"})
    assert "k must be" in rejected(422, files=files[:1], data={"k": "1001"})
    assert "unknown field" in rejected(422, files=files[:1], data={"normalize": "true"})
    assert "image 1:" in rejected(400, files=[files[0], ("images", ("x.jpg", b"garbage", "image/jpeg"))])
    assert "more than" in rejected(413, files=files + files[:1])
    assert "multipart" in rejected(415, json={"images": []})
    assert httpx.post(f"{server.url}/search", files=files[:1]).status_code == 401
    assert http.post("/embed", files=files[:1]).status_code == 200, "/embed still served beside /search"

@pytest.mark.slow
def test_search_by_key_and_thumbnails_through_a_real_server(server, http):
    """POST /search?key= follows a result; GET /thumbnail/{key} reads the member from its shard; keys are only
    looked up, so traversal attempts find nothing."""
    found = http.post("/search?key=000003&k=3")
    assert found.status_code == 200, found.text
    hits = found.json()["results"][0]["neighbours"]
    assert len(hits) == 3 and "000003" not in [h["key"] for h in hits] and hits[0]["label"] is not None
    assert http.post("/search?key=nope").status_code == 404
    assert http.post("/search?key=000003", files=[("images", ("a.jpg", b"x", "image/jpeg"))]).status_code == 422

    thumb = http.get("/thumbnail/000003?size=64")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "JPEG" and image.size == (28, 28)  # never enlarged
    assert Image.open(io.BytesIO(http.get("/thumbnail/000003?size=16").content)).size == (16, 16)
    assert http.get("/thumbnail/000003?size=9999").status_code == 422
    assert httpx.get(f"{server.url}/thumbnail/000003").status_code == 401
    assert http.get("/thumbnail/no-such-key").json()["error"] == "key 'no-such-key' is not in the index"
    for path in ("/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd", "/thumbnail/%2Fetc%2Fpasswd", "/thumbnail/../../etc/passwd",
                 f"/thumbnail/{index_path_of(server)}", "/page/..%2Fservice.py", "/page/service.py"):
        reply = http.send(http.build_request("GET", httpx.URL(server.url + path)))  # sent as written
        assert reply.status_code == 404 and b"root:" not in reply.content, (path, reply.text)

    page = httpx.get(f"{server.url}/")  # public: the page holds no data, its requests send the token
    assert page.status_code == 200 and 'id="file"' in page.text and "Content-Security-Policy" in page.headers
    assert httpx.get(f"{server.url}/page/page.js").headers["content-type"].startswith("text/javascript")


def index_path_of(server) -> str:
    """A file the server can read but the index does not name (its own log), as a thumbnail key."""
    return str(server.log_path).lstrip("/")


ARTIFACTS = Path(os.environ.get("BARLOW_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "runs" / "test-artifacts"))


def headless_chromium():
    """Headless Chromium driven through Debian's chromedriver (`make browser` installs both), or a skip."""
    try:
        from selenium import webdriver
    except ImportError:
        pytest.skip("selenium is not installed: pip install -e '.[dev]'")
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium with chromedriver here: make browser (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors in failure messages
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def wait_for_search(driver, query: str) -> str:
    """The page's status line once the search for `query` is over (data-state done or error)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def over(d):
        state = d.find_element("tag name", "body").get_attribute("data-state")
        line = d.find_element("id", "status").text
        return line if state == "error" or (state == "done" and query in line) else False

    state = lambda: (driver.find_element("tag name", "body").get_attribute("data-state"),  # noqa: E731
                     driver.find_element("id", "status").text, driver.get_log("browser"))
    return WebDriverWait(driver, 60).until(over, f"no end of the search for {query}: {state()}")


def rendered(driver) -> list[tuple[str, int]]:
    """(key, naturalWidth of its thumbnail) of every neighbour the page shows, in rank order."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#neighbours li')].map("
        "li => [li.dataset.key, li.querySelector('img').complete ? li.querySelector('img').naturalWidth : 0])")


@pytest.mark.slow
def test_search_page_in_a_real_browser(server, query_files):
    """Upload a re-encoded copy: its original comes first and every neighbour's thumbnail loaded; a click
    searches by that result; a wrong token shows the server's reason."""
    driver = headless_chromium()
    try:
        driver.get(f"{server.url}/")
        driver.find_element("id", "token").send_keys(TOKEN)
        copy = query_files[0]  # test image 3, resized and re-encoded
        driver.find_element("id", "file").send_keys(str(copy))
        assert "neighbours of" in wait_for_search(driver, copy.name)
        shown = rendered(driver)
        assert len(shown) == 12 and shown[0][0] == f"{QUERIES[0]:06d}", shown
        assert all(width > 0 for _, width in shown), shown
        assert "label" in driver.find_element("css selector", "#neighbours li figcaption").text
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "search-page.png"))

        second = shown[1][0]
        driver.find_element("css selector", "#neighbours li[data-rank='2']").click()
        assert second in wait_for_search(driver, second)
        after = rendered(driver)
        assert len(after) == 12 and second not in [key for key, _ in after] and all(w > 0 for _, w in after)
        assert driver.execute_script("return document.getElementById('query-image').naturalWidth") > 0

        token = driver.find_element("id", "token")
        token.clear()
        token.send_keys("wrong")
        driver.find_element("id", "file").send_keys(str(copy))
        assert "401" in wait_for_search(driver, copy.name) and "token" in driver.find_element("id", "status").text
    finally:
        driver.quit()


def test_search_without_an_index_answers_404():
    from serving.requests import RequestError
    from serving.search import open_index, parse_k, require_index

    assert open_index(None, {}) is None
    with pytest.raises(RequestError) as caught:
        require_index(None)
    assert caught.value.status == 404 and "BARLOW_INDEX_DIR" in caught.value.message
    assert parse_k("7") == 7
    for bad in ("0", "-3", "1001", "2.5", "ten", ""):
        with pytest.raises(RequestError):
            parse_k(bad)
