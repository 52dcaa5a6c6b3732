"""Spaces: a sound run trained into a picture run's space (`--bind-to`) shares its text side to the
byte, records its anchor, is refused when the text sides cannot match, and lets a sound find
pictures and a picture find sounds (CLI and Python API); `eval --task cross-modal` scores it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_audio
import tiny_models
from PIL import Image
from typer.testing import CliRunner

import mmret
from mmret import training
from mmret.cli import app
from mmret.data import PrepareConfig, prepare
from mmret.errors import MmretError
from mmret.runs import RunConfig, load_run_config, with_overrides
from mmret.runs.space import space_runs

runner = CliRunner()
COLOURS = {"rising": (220, 40, 40), "falling": (40, 40, 220), "low": (40, 160, 40), "high": (230, 230, 40),
           "noise": (128, 128, 128), "pulses": (150, 40, 160)}


def pictures_beside(sounds, root):
    """A picture for every sound, at the same relative path, coloured by the sound's kind."""
    rng = np.random.default_rng(0)
    for sound in sorted(sounds.rglob("*.txt")):
        rel = sound.relative_to(sounds)
        kind = rel.parts[0]
        pixels = np.clip(np.array(COLOURS[kind]) + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save((root / rel).with_suffix(".png"))
        (root / rel).write_text(sound.read_text())
    return root


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    data, runs = root / "data", root / "runs"
    sounds = tiny_audio.sound_folder(root / "sounds", n=18)
    pictures = pictures_beside(sounds, root / "pictures")
    for name, folder in (("sounds", sounds), ("pictures", pictures)):
        prepare(PrepareConfig(source="folder", root=folder, name=name, data_dir=data, val=0.2, test=0.2))
    w = {"root": root, "data": data, "runs": runs, "sounds": sounds, "pictures": pictures,
         "ast": str(tiny_audio.save_tiny_ast(root / "ast", spread=3.0)),
         "dinov2": str(tiny_models.save_tiny_dinov2(root / "dinov2")),
         "bert": str(tiny_models.save_tiny_bert(root / "bert", pooling_config="mean"))}
    w["pics"] = training.train(config(w, dataset="pictures", item=w["dinov2"], name="pics", epochs=30)).run_dir
    w["snd"] = training.train(config(w, dataset="sounds", item=w["ast"], name="snd", bind_to="pics",
                                     epochs=30)).run_dir
    return w


def config(world, **options) -> RunConfig:
    base = dict(text=world["bert"], data_dir=world["data"], runs_dir=world["runs"], epochs=2, batch_size=8,
                embed_dim=16, patience=0, workers=0, dropout=0.0, lr=1e-2, method="heads")
    return with_overrides(RunConfig(), {**base, **options})


@pytest.fixture
def copy(space, tmp_path):
    """The space's runs copied to a folder of the test's own, for tests that add runs to it (a search
    embeds a query with the newest run of its kind)."""
    import shutil

    shutil.copytree(space["runs"], tmp_path / "runs", symlinks=True)
    return {**space, "runs": tmp_path / "runs"}


@pytest.fixture
def env(space, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(space["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(space["runs"]))
    return space


def test_a_bound_run_embeds_text_to_the_anchors_bytes(space):
    captions = ["a rising whistle", "white noise hissing", "words neither run saw"]
    pics, snd = mmret.load(space["pics"]), mmret.load(space["snd"])
    assert pics.encode_text(captions).tobytes() == snd.encode_text(captions).tobytes()
    assert pics.modality.name == "image" and snd.modality.name == "audio"


def test_the_bound_run_records_its_anchor_and_a_chain_ends_at_the_root(copy):
    cfg = load_run_config(copy["runs"] / "snd")
    assert (cfg.train.bind_to, cfg.train.anchor) == ("pics", "pics")
    third = training.train(config(copy, dataset="sounds", item=copy["ast"], name="snd2", bind_to="snd")).run_dir
    assert load_run_config(third).train.anchor == "pics"  # bound to a run bound to pics: in pics' space
    assert [p.name for p in space_runs(third)] == ["pics", "snd", "snd2"]
    a, b = mmret.load(copy["runs"] / "pics"), mmret.load(third)
    assert a.encode_text(["a deep drone"]).tobytes() == b.encode_text(["a deep drone"]).tobytes()


def test_the_text_settings_come_from_the_run_bound_to(copy):
    cfg = config(copy, dataset="sounds", item=copy["ast"], name="dims", bind_to="pics", embed_dim=32, max_steps=1)
    run = training.train(cfg).run_dir
    saved = load_run_config(run)
    assert saved.method.embed_dim == 16 and saved.encoders.text == copy["bert"]


def test_a_text_side_that_cannot_match_is_refused_in_one_line(copy):
    cfg = config(copy, dataset="sounds", item=copy["ast"], name="wrong", bind_to="pics", head_layers=1)
    with pytest.raises(MmretError, match=r"^run pics's text side does not fit this run's \(text_tower\.\S+ differs\): "
                                         r"bind with the method and head settings") as e:
        training.train(cfg)
    assert "\n" not in str(e.value)
    result = runner.invoke(app, ["train", "--dataset", "sounds", "--bind-to", "nothing-here", "--runs-dir",
                                 str(copy["runs"]), "--data-dir", str(copy["data"])])
    assert result.exit_code == 1 and "no run 'nothing-here'" in result.output and "Traceback" not in result.output


def test_a_sound_finds_pictures_and_a_picture_finds_sounds_from_the_cli(env):
    sound = next(p for p in sorted((env["sounds"] / "rising").iterdir()) if p.suffix != ".txt")
    found = runner.invoke(app, ["search", "--audio", str(sound), "--run", "pics", "--json", "-k", "3"])
    assert found.exit_code == 0, found.output
    answer = json.loads(found.stdout)
    assert answer["modality"] == "image" and answer["query_run"] == "snd" and len(answer["results"][0]["images"]) == 3
    table = runner.invoke(app, ["search", "--audio", str(sound), "--run", "pics"])
    assert table.exit_code == 0 and "embedded by run snd, which shares run pics's space" in table.output
    picture = sorted((env["pictures"] / "noise").glob("*.png"))[0]
    back = runner.invoke(app, ["search", "--image", str(picture), "--run", "snd", "--json"])
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout)["modality"] == "audio" and json.loads(back.stdout)["query_run"] == "pics"


def test_a_run_without_a_partner_of_the_query_kind_says_how_to_make_one(copy, monkeypatch):
    env = copy
    monkeypatch.setenv("MMRET_RUNS_DIR", str(env["runs"]))
    training.train(config(env, dataset="pictures", item=env["dinov2"], name="alone", max_steps=1))
    sound = next(p for p in sorted((env["sounds"] / "low").iterdir()) if p.suffix != ".txt")
    result = runner.invoke(app, ["search", "--audio", str(sound), "--run", "alone"])
    assert result.exit_code == 1
    assert ("run alone searches images, not audio, and no run over audio shares its space: query with --image PATH, "
            "or train one into it (mmret train --dataset <audio> --bind-to alone)") in " ".join(result.output.split())


def test_the_python_api_searches_pictures_with_a_sound(space):
    pics = mmret.load(space["pics"])
    sound = next(p for p in sorted((space["sounds"] / "high").iterdir()) if p.suffix != ".txt")
    result = pics.search(item=sound, query_modality="audio", k=5)
    assert result.query_run == "snd" and len(result.results[0].items) == 5
    assert all(h.path.endswith(".png") for h in result.results[0].items)


def test_cross_modal_eval_scores_both_ways_with_chance_and_the_caption_chain(env):
    result = runner.invoke(app, ["eval", "--task", "cross-modal", "--run", "pics", "--queries", "sounds",
                                 "--items", "pictures", "--bootstrap", "50", "--format", "json"])
    assert result.exit_code == 0, result.output
    (r,) = json.loads(result.stdout)
    assert r["runs"] == {"audio": "snd", "image": "pics"} and r["space"] == "pics"
    assert [(row["direction"], row["route"]) for row in r["rows"]] == [
        ("audio → image", "direct"), ("audio → image", "caption chain"),
        ("image → audio", "direct"), ("image → audio", "caption chain")]
    assert r["sizes"]["candidates"] == 18 and r["sizes"]["pairs"] == r["sizes"]["queries"]  # one picture a sound
    n = r["sizes"]["candidates"]
    assert r["chance"]["audio → image"]["r1"] == pytest.approx(1 / n)
    assert r["chance"]["audio → image"]["r5"] == pytest.approx(5 / n)
    direct = r["rows"][0]
    assert direct["ci"]["r5"][0] <= direct["metrics"]["r5"] <= direct["ci"]["r5"][1]
    table = runner.invoke(app, ["eval", "--task", "cross-modal", "--run", "snd", "--queries", "sounds",
                                "--items", "pictures"])
    assert table.exit_code == 0 and "space of pics" in table.output and "caption chain" in table.output


def test_cross_modal_pairs_from_a_table_and_its_refusals(env, tmp_path):
    from mmret.evaluation.cross_modal import evaluate_cross_modal

    sound_ids = [p.relative_to(env["sounds"]).as_posix() for p in sorted(env["sounds"].rglob("*.*"))
                 if p.suffix != ".txt"]
    table = tmp_path / "pairs.csv"
    table.write_text("sound,picture\n" + "".join(f"{s},noise/noise-04.png\n" for s in sound_ids))
    r = evaluate_cross_modal(env["pics"], "sounds", "pictures", pairs=table, data_dir=env["data"])
    assert r.sizes["pairs"] == r.sizes["queries"] and r.sizes["items"] == 1
    same = runner.invoke(app, ["eval", "--task", "cross-modal", "--run", "pics", "--queries", "pictures",
                               "--items", "pictures"])
    assert same.exit_code == 1 and "both hold images" in same.output
    alone = runner.invoke(app, ["eval", "--task", "cross-modal", "--run", "pics", "--queries", "sounds"])
    assert alone.exit_code == 1 and "needs --queries DATASET and --items DATASET" in alone.output


def test_pair_metrics_and_chance_by_hand():
    from mmret.metrics.pairs import chance_metrics, pair_ranks, rank_metrics

    scores = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, 0.8], [0.1, 0.7, 0.7]])
    right = np.array([[True, False, False], [True, False, False], [False, False, True]])
    ranks = pair_ranks(scores, right)
    assert ranks.tolist() == [1, 3, 2]  # a tie with a wrong candidate counts against the right one
    m = rank_metrics(ranks, (1, 2))
    assert (m["r1"], m["r2"], m["mrr"], m["medr"]) == pytest.approx((1 / 3, 2 / 3, (1 + 1 / 3 + 1 / 2) / 3, 2))
    c = chance_metrics(3, np.array([1, 2]), (1,))
    assert c["r1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert c["mrr"] == pytest.approx(((1 + 1 / 2 + 1 / 3) / 3 + (2 / 3 + 1 / 3 * 1 / 2)) / 2)


def test_a_text_query_over_a_space_finds_pictures_and_sounds_ranked_apart(env):
    result = runner.invoke(app, ["search", "a rising whistle", "--run", "snd", "--space", "--json", "-k", "2"])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [(a["run"], a["modality"]) for a in answers] == [("pics", "image"), ("snd", "audio")]
    assert len(answers[0]["results"][0]["images"]) == 2 and len(answers[1]["results"][0]["audio"]) == 2
    table = runner.invoke(app, ["search", "a rising whistle", "--run", "pics", "--space"])
    assert table.exit_code == 0 and "scores of different kinds of items are not comparable" in table.output
    sound = next(p for p in sorted((env["sounds"] / "falling").iterdir()) if p.suffix != ".txt")
    both = mmret.load(env["pics"]).search_space(item=sound, query_modality="audio", k=3)
    assert [r.query_run for r in both] == ["snd", None]  # the sound finds pictures through snd, and sounds as itself


@pytest.fixture(scope="module")
def served(space):
    from mmret.serve.config import ServeConfig
    from mmret.serve.service import SearchService

    service = SearchService.open(ServeConfig(space["pics"], k=6, allow_host=("testserver", "127.0.0.1")))
    yield service
    service.close()


def test_the_server_of_a_picture_run_takes_a_sound_and_says_through_which_run(served, space):
    from fastapi.testclient import TestClient

    from mmret.serve.app import create_app

    client = TestClient(create_app(served))
    info = client.get("/api/info").json()
    assert [(s["modality"], s["run"]) for s in info["space"]] == [("audio", "snd")] and ".ogg" in info["space"][0][
        "extensions"]
    sound = next(p for p in sorted((space["sounds"] / "pulses").iterdir()) if p.suffix != ".txt")
    answer = client.post("/api/search/upload", files={"file": (sound.name, sound.read_bytes())}, data={"k": "4"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["query_run"] == "snd" and body["modality"] == "image" and len(body["results"]) == 4
    assert all(hit["id"].endswith(".png") for hit in body["results"])
    picture = sorted((space["pictures"] / "low").glob("*.png"))[0]
    own = client.post("/api/search/upload", files={"file": (picture.name, picture.read_bytes())}).json()
    assert own["query_run"] is None
    text = client.post("/api/search/upload", files={"file": ("notes.txt", b"neither a picture nor a sound")})
    assert text.status_code == 415 and "is not a picture or sound mmret can read" in text.json()["error"]


def test_a_sound_dropped_on_the_picture_page_in_a_real_browser(served, space, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    from test_browser import WAIT, open_browser

    from mmret.serve.app import create_app
    from mmret.serve.server import LiveServer

    sound = next(p for p in sorted((space["sounds"] / "rising").iterdir()) if p.suffix != ".txt")
    with LiveServer(create_app(served)) as live:
        browser = open_browser(tmp_path / "profile")
        try:
            wait = WebDriverWait(browser, WAIT)
            browser.get(live.url + "/")
            wait.until(ec.text_to_be_present_in_element((By.ID, "about"), "pictures"))
            assert browser.find_element(By.ID, "file-label").text == "Search with a picture or a sound"
            assert ".ogg" in browser.find_element(By.ID, "file").get_attribute("accept")
            browser.find_element(By.ID, "file").send_keys(str(sound))
            wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
            hits = [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "#results .hit")]
            status = browser.find_element(By.ID, "status").text
            played = browser.find_elements(By.CSS_SELECTOR, "#query-media audio")  # the sound is played, not drawn
            browser.save_screenshot(str(tmp_path / "space.png"))
        finally:
            browser.quit()
    assert len(hits) == 18 and all(h.endswith(".png") for h in hits)  # every picture: the page asks for 24
    assert f"like the sound {sound.name} (through run snd, same space)" in status and len(played) == 1


@pytest.mark.parametrize("method", ["bridge", "lora"])
def test_bridge_and_tower_methods_bind_the_same_way(copy, method):
    extra = {"rank": 2} if method == "lora" else {}
    anchor = training.train(config(copy, dataset="pictures", item=copy["dinov2"], name=f"{method}-pictures",
                                   method=method, epochs=1, **extra)).run_dir
    bound = training.train(config(copy, dataset="sounds", item=copy["ast"], name=f"{method}-sounds", method=method,
                                  epochs=1, bind_to=anchor.name, **extra)).run_dir
    captions = ["a rising whistle", "a clock ticking"]
    assert mmret.load(bound).encode_text(captions).tobytes() == mmret.load(anchor).encode_text(captions).tobytes()


def test_a_bound_run_resumed_keeps_its_text_side(copy):
    run = training.train(config(copy, dataset="sounds", item=copy["ast"], name="longer", bind_to="pics",
                                epochs=1)).run_dir
    sounds = mmret.load(run).gallery().paths[:2]
    before = mmret.load(run, checkpoint="last").encode_audio(sounds)
    training.resume(run, epochs=3)
    after = mmret.load(run, checkpoint="last")
    captions = ["a deep drone"]
    assert after.encode_text(captions).tobytes() == mmret.load(copy["runs"] / "pics").encode_text(captions).tobytes()
    assert not np.array_equal(after.encode_audio(sounds), before)  # its item side did train on
