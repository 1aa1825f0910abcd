"""The web page, driven in a real headless browser (Playwright + the system's Chromium), through
gradio_client against the served page, and through its handlers directly."""

from __future__ import annotations

import copy
import io
import logging
import os
import shutil
import socket
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs a Chromium binary (apt-get install chromium)")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app():
    """(the launched page, its address)."""
    from conceptattention.app import launch

    port = free_port()
    page_app = launch("shapes", port=port, block=False)
    yield page_app, f"http://127.0.0.1:{port}"
    page_app.close()


@pytest.fixture(scope="module")
def served(served_app):
    return served_app[1]


@pytest.fixture(scope="module")
def client(served, tmp_path_factory):
    from gradio_client import Client

    return Client(served, verbose=False, download_files=str(tmp_path_factory.mktemp("client-downloads")))


@pytest.fixture
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1280, "height": 1400})
        tab.goto(served)
        yield tab
        browser.close()


def test_prompt_and_concepts_give_images_in_the_page(page):
    page.locator("#prompt textarea").fill("a yellow triangle and a green circle in the sky")
    page.locator("#gen-concepts textarea").fill("triangle, circle sky")
    page.locator("#generate").click()
    page.wait_for_selector("#overlays img", timeout=120_000)
    page.wait_for_selector("#image-out img", timeout=30_000)
    page.wait_for_selector("#segmentation img", timeout=30_000)
    assert page.locator("#overlays img").count() >= 3
    labels = page.locator("#overlays").inner_text()
    for word in ("triangle", "circle", "sky"):
        assert word in labels
    link = page.locator("#download a").first
    link.wait_for(timeout=30_000)
    href = link.get_attribute("href")
    assert href.endswith("conceptattention_maps.zip")
    archive = zipfile.ZipFile(io.BytesIO(page.request.get(href).body()))  # the download really serves the arrays
    assert {"maps.npy", "maps_raw.npy", "result.json"} <= set(archive.namelist())
    maps = np.load(io.BytesIO(archive.read("maps.npy")))
    assert maps.shape == (3, 64, 64) and np.allclose(maps.sum(0), 1.0, atol=1e-4)


def test_bad_input_shows_one_clear_message(page):
    page.locator("#gen-concepts textarea").fill("")
    page.locator("#generate").click()
    page.get_by_text("enter at least one concept word").first.wait_for(timeout=60_000)
    page.locator("#prompt textarea").fill("a purple dog")
    page.locator("#gen-concepts textarea").fill("dog")
    page.locator("#generate").click()
    page.get_by_text("does not know").first.wait_for(timeout=60_000)


def test_the_model_is_fixed_at_launch_and_shown_read_only(page, served_app, client):
    page.locator("#prompt textarea").wait_for(timeout=60_000)  # the page has rendered its boxes
    assert "shapes" in page.locator("#model-name").inner_text()
    assert page.locator("#model").count() == 0  # no model box to type into
    assert page.get_by_label("model", exact=True).count() == 0
    assert page.get_by_label("prompt", exact=True).count() == 1  # (labels are found at all)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = {endpoint: [p["parameter_name"] for p in api[endpoint]["parameters"]] for endpoint in api}
    assert names["/generate"] == ["prompt", "concepts", "steps", "seed"]  # a request cannot name a model
    assert names["/encode"] == ["image", "caption", "concepts", "t", "samples"]
    handlers = served_app[0].handlers
    assert not handlers.allow_model_choice
    loaded = handlers.pipelines.get()
    _, _, _, archive = handlers.generate("a red circle", "circle", 1, 0, model_name="/no/such/model")
    assert handlers.pipelines.names() == ["shapes"] and handlers.pipelines.get() is loaded  # the name was ignored
    import json

    assert json.loads(zipfile.ZipFile(archive).read("result.json"))["model"] == "shapes"


def _corrupt_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    (folder / "config.json").write_text('{"config": {}}')
    return folder


def test_with_model_choice_a_bad_name_gives_one_message_without_paths(tmp_path):
    import gradio as gr

    from conceptattention.app import AppHandlers, build_app

    page_app = build_app("shapes", allow_model_choice=True)
    try:
        boxes = [b for b in page_app.blocks.values() if isinstance(b, gr.Textbox) and b.label == "model"]
        assert len(boxes) == 1 and boxes[0].value == "shapes"
        assert page_app.handlers.allow_model_choice
    finally:
        page_app.close()
    assert not page_app.handlers.folders.root.exists()  # closing the page removed its temp root

    handlers = AppHandlers("shapes", allow_model_choice=True)
    try:
        empty = tmp_path / "empty"
        empty.mkdir()
        names = [
            str(tmp_path / "missing"),
            str(empty),
            str(_corrupt_model(tmp_path / "corrupt")),
            "/etc",
            "not a model",
        ]
        for name in names:
            with pytest.raises(gr.Error) as caught:
                handlers.generate("a red circle", "circle", 1, 0, model_name=name)
            assert caught.value.message == f"could not load model {name!r}: give 'shapes' or a model this server has"
        with pytest.raises(gr.Error) as caught:
            handlers.encode(_small_png(tmp_path), "", "circle", 0.5, 1, model_name=str(tmp_path / "missing"))
        assert "give 'shapes' or a model this server has" in caught.value.message
        assert handlers.pipelines.names() == []  # nothing loaded, the launch model not evicted
        handlers.generate("a red circle", "circle", 1, 0, model_name=" shapes ")
        handlers.generate("a red circle", "circle", 1, 0, model_name="")
        assert handlers.pipelines.names() == ["shapes"]
    finally:
        handlers.close()


def _small_png(folder: Path) -> Path:
    from PIL import Image

    path = folder / "small.png"
    picture = Image.new("RGB", (64, 64), (60, 140, 60))
    picture.paste((220, 30, 30), (10, 10, 30, 30))
    picture.save(path)
    return path


def test_a_corrupt_launch_model_gives_a_readable_message(tmp_path, caplog):
    import gradio as gr

    from conceptattention.app import AppHandlers, launch
    from conceptattention.errors import ConceptAttentionError

    corrupt = _corrupt_model(tmp_path / "corrupt")
    handlers = AppHandlers(str(corrupt))
    try:
        assert handlers.display == "corrupt"  # the page names the folder, not its path
        with caplog.at_level(logging.ERROR, logger="conceptattention.app"):
            with pytest.raises(gr.Error) as caught:
                handlers.generate("a red circle", "circle", 1, 0)
        assert caught.value.message == "could not load this server's model; the server log has the details"
        assert any(record.exc_info for record in caplog.records)  # the details are in the server's log
    finally:
        handlers.close()
    with pytest.raises(ConceptAttentionError, match="corrupt"):  # the operator is told at launch, with the path
        launch(str(corrupt), port=free_port(), block=False)


class _FakePipeline:
    """Returns a copy of a real result; waits on ``gate`` first when given one, or raises ``error``."""

    def __init__(self, result, gate=None, error=None):
        self.result, self.gate, self.error = result, gate, error
        self.started = threading.Event()

    def generate(self, prompt, concepts, steps, seed):
        self.started.set()
        if self.error is not None:
            raise self.error
        if self.gate is not None:
            assert self.gate.wait(30)
        return copy.deepcopy(self.result)


def test_one_visitors_model_never_breaks_anothers_running_request(served_app):
    from conceptattention.app import AppHandlers, PipelineCache

    real = served_app[0].handlers.pipelines.get()
    with real.lock:
        result = real.pipe.generate("a red circle", ["circle"], steps=1)
    gate = threading.Event()
    made: dict[str, _FakePipeline] = {}

    def loader(name, device):
        made[name] = _FakePipeline(result, gate if name == "slow" else None)
        return made[name]

    handlers = AppHandlers("shapes", allow_model_choice=True, loader=loader)
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(handlers.generate, "a red circle", "circle", 1, 0, model_name="slow")
            while "slow" not in made or not made["slow"].started.wait(0.05):
                assert not running.done(), running.exception()
            handlers.generate("a red circle", "circle", 1, 0, model_name="other")  # evicts "slow" (2 at most)
            handlers.generate("a red circle", "circle", 1, 0)
            assert handlers.pipelines.names() == ["other", "shapes"]
            gate.set()
            assert len(running.result(timeout=30)) == 4  # the evicted model's request still finished
    finally:
        handlers.close()

    cache = PipelineCache("shapes", "cpu", capacity=2, loader=lambda name, device: object())
    launch_entry = cache.get()
    for name in ("a", "b", "c", "a"):
        cache.get(name)
    assert cache.names() == ["shapes", "a"] and cache.get("") is launch_entry  # the launch model is always kept
    assert cache.get("a").lock is not launch_entry.lock  # each pipeline has its own lock


def test_every_error_is_one_readable_message(served_app, client, caplog, tmp_path):
    import gradio as gr
    from gradio_client.exceptions import AppError

    from conceptattention.app import AppHandlers
    from conceptattention.errors import ConceptAttentionError

    with pytest.raises(AppError, match=r"seed must be an integer from 0 to 2\*\*63 - 1"):  # through the server
        client.predict("a red circle", "circle", 4, 2**70, api_name="/generate")
    handlers = served_app[0].handlers
    bad_generate = [
        (dict(seed=2**70), "seed must be an integer"),
        (dict(seed=float(2**70)), "seed must be"),
        (dict(seed=-1), "seed must be"),
        (dict(seed=1.5), "seed must be"),
        (dict(seed=None), "seed must"),
        (dict(seed=True), "seed must be"),
        (dict(steps=0), "steps must be an integer from 1 to 1000"),
        (dict(steps=1001), "steps must be"),
        (dict(steps=float("nan")), "steps must be"),
        (dict(concepts=""), "enter at least one concept word"),
        (dict(concepts=None), "enter at least"),
    ]
    for change, message in bad_generate:
        args = dict(prompt="a red circle", concepts="circle", steps=1, seed=0) | change
        with pytest.raises(gr.Error, match=message.replace("*", r"\*")):
            handlers.generate(**args)
    image = _small_png(tmp_path)
    bad_encode = [
        (dict(t=float("nan")), "t .* must be a number from 0 to 1"),
        (dict(t=1.5), "must be a number"),
        (dict(t=-0.1), "must be a number"),
        (dict(samples=0), "samples must be an integer from 1 to 64"),
        (dict(samples=65), "samples must be"),
        (dict(samples=2.5), "samples must be"),
        (dict(image=None), "upload an image first"),
    ]
    for change, message in bad_encode:
        args = dict(image=str(image), caption="", concepts="circle", t=0.5, samples=1) | change
        with pytest.raises(gr.Error, match=message):
            handlers.encode(**args)

    real = handlers.pipelines.get()
    with real.lock:
        result = real.pipe.generate("a red circle", ["circle"], steps=1)
    failing = {
        "boom": RuntimeError("boom in /srv/secret/weights"),
        "known": ConceptAttentionError("no shapes model in /srv/secret/weights (expected model.safetensors)"),
    }
    fakes = AppHandlers(
        "shapes", allow_model_choice=True, loader=lambda name, device: _FakePipeline(result, error=failing.get(name))
    )
    try:
        with caplog.at_level(logging.ERROR, logger="conceptattention.app"):
            with pytest.raises(gr.Error) as caught:
                fakes.generate("a red circle", "circle", 1, 0, model_name="boom")
        assert caught.value.message == "internal error (RuntimeError); the server log has the details"
        assert any(
            "boom in /srv/secret/weights" in record.getMessage()
            or (record.exc_info and "boom" in str(record.exc_info[1]))
            for record in caplog.records
        )
        with pytest.raises(gr.Error) as caught:
            fakes.generate("a red circle", "circle", 1, 0, model_name="known")
        assert "/srv" not in caught.value.message and "no shapes model in <path>" in caught.value.message
    finally:
        fakes.close()


def _maps(archive: str) -> np.ndarray:
    return np.load(io.BytesIO(zipfile.ZipFile(archive).read("maps.npy")))


def test_concurrent_generate_and_encode_all_succeed_with_the_sequential_maps(client, tmp_path):
    from gradio_client import handle_file
    from PIL import Image

    first = client.predict("a red circle and a blue square on grass", "circle square grass", 4, 0, api_name="/generate")
    picture = tmp_path / "first.png"
    Image.open(first[0]).convert("RGB").resize((64, 64), Image.NEAREST).save(picture)
    prompts = [
        "a red circle on grass",
        "a blue square in the sky",
        "a yellow triangle and a green circle",
        "a gray square and a red triangle on grass",
        "a green circle in the sky",
    ]
    requests = []
    for k, prompt in enumerate(prompts):
        requests.append(("/generate", (prompt, "circle square triangle grass sky", 4, 10 + k)))
        requests.append(
            (
                "/encode",
                (
                    handle_file(str(picture)),
                    ["", "a red square"][k % 2],
                    "circle square grass",
                    [0.3, 0.5, 0.7, 0.4, 0.6][k],
                    1 + k % 3,
                ),
            )
        )

    def call(request):
        api_name, args = request
        return _maps(client.predict(*args, api_name=api_name)[3])

    sequential = [call(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        concurrent = list(pool.map(call, requests))  # any failure raises here
    assert len(concurrent) == len(requests) == 10
    for alone, together in zip(sequential, concurrent):
        assert alone.shape == together.shape
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)


def test_request_files_on_disk_are_bounded(served_app, tmp_path):
    from conceptattention.app import GRADIO_CACHE, KEEP_REQUESTS

    page_app = served_app[0]
    assert page_app.delete_cache == GRADIO_CACHE  # Gradio's own cache is pruned by age
    handlers = page_app.handlers
    image = _small_png(tmp_path)
    for k in range(50):
        if k % 2:
            handlers.encode(str(image), "", "circle square grass", 0.5, 1)
        else:
            handlers.generate("a red circle and a blue square on grass", "circle square grass", 1, k)
    folders = handlers.folders.folders()
    assert 1 <= len(folders) <= KEEP_REQUESTS == 16
    assert all(p.parent == handlers.folders.root for p in folders)
    assert all([f.name for f in folder.iterdir()] == ["conceptattention_maps.zip"] for folder in folders)
    total = sum(f.stat().st_size for f in handlers.folders.root.rglob("*") if f.is_file())
    assert total < 6_000_000, total  # 16 zips of about 0.2 MB; before, 50 requests left 58 MB
