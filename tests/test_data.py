"""mmlit.data: procedural tasks (determinism, disjoint splits, verifiable answers, chance levels), datasets,
mixtures, filters and loss re-weighting (exact values, packing, the cross-process denominator on real gloo ranks)."""
import hashlib, inspect, itertools, json, math, re, subprocess, sys, textwrap
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from mmlit.data import CORE_TASKS, TASKS as ALL_TASKS
from mmlit.data import (CAPTION_PROMPT, COLOURS, DEFAULT_LEVEL, LEVELS, SHAPES, SPLITS, BarChart, BlindBaseline,
                        ColourPosition, CompareCount, DigitSum, Mixture, ShapeCount, SmallWord, Task, VideoMotion,
                        apply_filters,
                        blind_accuracy, blind_baseline, chart_geometry, digit_pool, draw_scene, heuristic_filter,
                        image_hash, load_digit_images, loss_weights, make_task, mean_across_ranks, media,
                        placeholders_match, question_text, repeat_indices, repetition_filter, repetition_score,
                        sample_rng, score_filter, supervised_counts, task_blind_baseline, to_dataset, user_prompt,
                        weighted_loss, word_label)
TASKS = {n: ALL_TASKS[n] for n in CORE_TASKS}   # chapter 04's tasks (chapter 10 registers the jigsaw tasks; tests/test_jigsaw.py)

N = {"train": 300, "validation": 100, "test": 200}

@pytest.fixture(scope="module")
def drawn():
    "Samples of every task and split, drawn once for the module."
    return {name: {sp: list(make_task(name).stream(sp, N[sp])) for sp in SPLITS} for name in TASKS}

# --- tasks -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_same_seed_same_sample_and_any_order(name):
    a = [make_task(name).sample(i, "validation") for i in (7, 3)]
    b = list(make_task(name).stream("validation", 8))
    for s, i in zip(a, (7, 3)):
        t = b[i]
        assert [image_hash(x) for x in s["images"]] == [image_hash(x) for x in t["images"]]
        assert s["conversation"] == t["conversation"] and s["meta"] == t["meta"] and s["id"] == t["id"]
    other = make_task(name, seed=1).sample(7, "validation")
    assert [image_hash(x) for x in other["images"]] != [image_hash(x) for x in a[0]["images"]]

@pytest.mark.parametrize("name", list(TASKS))
def test_splits_share_no_image(name, drawn):
    hashes = {sp: {image_hash(im) for s in drawn[name][sp] for im in s["images"]} for sp in SPLITS}
    assert not hashes["train"] & hashes["test"]
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["validation"] & hashes["test"]

@pytest.mark.parametrize("name", list(TASKS))
def test_sample_format(name, drawn):
    t = make_task(name)
    for s in drawn[name]["train"][:100]:
        assert placeholders_match(s), s["id"]
        conv = s["conversation"]
        assert [m["role"] for m in conv] == ["user", "assistant"] and conv[1]["content"] == s["answer"]
        assert s["task"] == name and s["id"].startswith(f"{name}/train/0/")
        assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in s["images"])
        assert s["answer"] in t.answer_space and s["answer"] in s["meta"]["options"]
        json.dumps(s["meta"])                       # the scene is JSON-serialisable
        assert t.verify(s) and t.check(s["answer"].upper() + ".", s["answer"])
        n_img = conv[0]["content"].count("<image>")
        if s["video"]: assert media(s) == {"videos": [s["images"]]} and n_img == 0
        else: assert media(s) == {"images": s["images"]} and n_img == len(s["images"])

@pytest.mark.parametrize("name", list(TASKS))
def test_chance_matches_the_blind_guesser(name, drawn):
    t, ss = make_task(name), drawn[name]["train"]
    tol = 3 * math.sqrt(t.chance * (1 - t.chance) / len(ss)) + 0.01
    assert abs(blind_accuracy(ss) - t.chance) < tol
    assert set(Counter(s["answer"] for s in ss)) <= set(t.answer_space)

def test_uniform_answers_cover_the_answer_space(drawn):
    for name in ("count", "bar_chart", "small_word", "compare_count"):
        c = Counter(s["answer"] for s in drawn[name]["train"])
        assert set(c) == set(make_task(name).answer_space), name

# --- answers re-derived from the pixels and the scene ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["count", "colour_position", "compare_count"])
def test_scene_redraws_the_image(name, drawn):
    t = make_task(name)
    for s in drawn[name]["test"][:40]:
        scenes = s["meta"]["scenes"] if name == "compare_count" else [s["meta"]["objects"]]
        assert [image_hash(draw_scene(o, t.size)) for o in scenes] == [image_hash(im) for im in s["images"]]

def test_colour_position_pixels(drawn):
    for s in drawn["colour_position"]["test"]:
        a = np.asarray(s["images"][0])
        objs = s["meta"]["objects"]
        for o in objs: assert tuple(a[o["y"], o["x"]]) == COLOURS[o["colour"]]
        left_to_right = [o["colour"] for o in sorted(objs, key=lambda o: o["x"])]
        q = s["conversation"][0]["content"]
        if "What colour" in q:
            pos = next(p for p in ("left", "middle", "right") if f"on the {p}?" in q)
            assert s["answer"] == left_to_right[("left", "middle", "right").index(pos)]
        else:
            colour = q.split("Where is the ")[1].split()[0]
            assert s["answer"] == ("left", "middle", "right")[left_to_right.index(colour)]

def test_count_counts_the_named_shape(drawn):
    for s in drawn["count"]["test"]:
        shape = s["conversation"][0]["content"].split("How many ")[1].split("s are")[0]
        assert int(s["answer"]) == sum(o["shape"] == shape for o in s["meta"]["objects"])

def test_bar_heights_read_from_pixels(drawn):
    for s in drawn["bar_chart"]["test"]:
        m, a = s["meta"], np.asarray(s["images"][0])
        g = chart_geometry(a.shape[1], len(m["values"]))
        ph = g["bottom"] - g["top"]
        for (x0, x1), v, c in zip(g["bars"], m["values"], m["colours"]):
            col = a[g["top"]:g["bottom"], (x0 + x1) // 2]
            height = int((col == np.array(COLOURS[c])).all(1).sum())
            assert round(height / ph * m["max_value"]) == v
        bar = s["conversation"][0]["content"].split("bar ")[1][0]
        assert s["answer"] == str(m["values"][ord(bar) - 65])

def test_digit_sum_from_sklearn_labels_and_split_pools(drawn):
    from sklearn.datasets import load_digits
    target = load_digits().target
    pools = {sp: set(digit_pool(sp).tolist()) for sp in SPLITS}
    assert sum(map(len, pools.values())) == len(target) == 1797
    assert not (pools["train"] & pools["test"]) and not (pools["train"] & pools["validation"]) and not (pools["validation"] & pools["test"])
    for sp in SPLITS:
        for s in drawn["digit_sum"][sp]:
            idx = s["meta"]["digit_indices"]
            assert set(idx) <= pools[sp]
            assert int(s["answer"]) == int(target[idx].sum())

def test_digits_need_sklearn(monkeypatch):
    load_digit_images.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"): DigitSum().sample(0)
    monkeypatch.undo(); load_digit_images.cache_clear()
    assert DigitSum().sample(0)["answer"]

def test_small_word_is_printed_where_meta_says(drawn):
    for s in drawn["small_word"]["test"][:60]:
        m, img = s["meta"], s["images"][0]
        assert img.size == (1024, 768)
        label = word_label(m["word"], m["font_size"])
        assert image_hash(img.crop(tuple(m["box"]))) == image_hash(label)
        assert s["answer"] == m["word"] and label.height <= 20

def test_video_only_the_answer_moves(drawn):
    for s in drawn["video_motion"]["test"][:60]:
        f0, f1 = (np.asarray(s["images"][i]).astype(int) for i in (0, -1))
        changed = (f0 != f1).any(-1)
        colours = {tuple(p) for p in np.concatenate([f0[changed], f1[changed]])}
        mover = next(o for o in s["meta"]["objects"] if o["shape"] == s["answer"])
        assert changed.any() and colours <= {COLOURS[mover["colour"]], (246, 244, 238)}
        assert len(set(mover["xs"])) > 1 and all(len(set(o["xs"])) == 1 for o in s["meta"]["objects"] if o is not mover)

@pytest.mark.parametrize("frames", [4, 8])
def test_video_lengths(frames):
    s = VideoMotion(n_frames=frames).sample(0, "test")
    assert len(s["images"]) == frames and s["video"] and s["conversation"][0]["content"].startswith("<video>\n")

def test_three_image_comparison():
    t = CompareCount(n_images=3)
    s = t.sample(1)
    assert len(s["images"]) == 3 and "Image-3: <image>" in s["conversation"][0]["content"] and t.chance == 1 / 3
    assert t.verify(s)

# --- bad data --------------------------------------------------------------------------------------------------------

def test_bad_requests_raise_value_errors():
    t = ShapeCount()
    for call, msg in [(lambda: t.sample(0, "dev"), "unknown split"), (lambda: t.sample(-1), "non-negative"),
                      (lambda: t.sample(1.5), "non-negative int"), (lambda: t.stream("eval"), "unknown split"),
                      (lambda: t.stream("train", -2), "n must be"), (lambda: make_task("ocr"), "unknown task"),
                      (lambda: CompareCount(n_images=5), "n_images"), (lambda: sample_rng("x", "train", 0, seed=-3), "seed"),
                      (lambda: to_dataset(t, "train"), "needs n"), (lambda: Mixture([]), "at least one"),
                      (lambda: Mixture([(t, -1)], n=5), "> 0"), (lambda: Mixture([(t, 1)], split="dev", n=5), "unknown split")]:
        with pytest.raises(ValueError, match=msg): call()

# --- difficulty levels -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def levelled():
    "Train samples of every task at every level, drawn once for the module."
    n = lambda name: 40 if name == "small_word" else 150
    return {name: {level: list(make_task(name, level=level).stream("train", n(name))) for level in LEVELS} for name in TASKS}

def _rising(xs): return all(a < b for a, b in zip(xs, xs[1:]))
def _falling(xs): return _rising([-x for x in xs])
def _mean(xs): return float(np.mean(list(xs)))

@pytest.mark.parametrize("name", list(TASKS))
def test_every_level_draws_verified_samples(name, levelled):
    for level in LEVELS:
        t = make_task(name, level=level)
        assert t.level == level and f"level={level}," in repr(t) and t.overrides == {}
        for s in levelled[name][level]:
            assert t.verify(s) and placeholders_match(s), s["id"]
            assert s["answer"] in t.answer_space and set(s["meta"]["options"]) <= set(t.answer_space)
            assert s["meta"]["level"] == level
            assert json.loads(json.dumps(s["meta"])) == s["meta"]

@pytest.mark.parametrize("name", list(TASKS))
def test_chance_at_every_level_matches_the_blind_guesser(name, levelled):
    for level in LEVELS:
        t, ss = make_task(name, level=level), levelled[name][level]
        tol = 3 * math.sqrt(t.chance * (1 - t.chance) / len(ss)) + 0.02
        assert abs(blind_accuracy(ss) - t.chance) < tol, (level, blind_accuracy(ss), t.chance)

@pytest.mark.parametrize("name", list(TASKS))
def test_the_default_level_is_the_task_without_a_level(name):
    for i in (0, 5):
        a, b = make_task(name).sample(i, "validation"), make_task(name, level=DEFAULT_LEVEL).sample(i, "validation")
        assert [image_hash(x) for x in a["images"]] == [image_hash(x) for x in b["images"]]
        assert a["conversation"] == b["conversation"]
        assert "level" not in a["meta"] and b["meta"] == dict(a["meta"], level=DEFAULT_LEVEL)
    t, cls = make_task(name), TASKS[name]
    assert t.level == DEFAULT_LEVEL and all(getattr(t, k) == v for k, v in cls.levels[DEFAULT_LEVEL].items())
    params = inspect.signature(cls.__init__).parameters     # what a recipe's task entry is checked against
    assert "level" in params and set(cls.levels[DEFAULT_LEVEL]) <= set(params) and sorted(cls.levels) == list(LEVELS)

def test_chance_and_answer_space_never_grow_easier(levelled):
    for name in TASKS:
        ts = [make_task(name, level=level) for level in LEVELS]
        assert all(a.chance >= b.chance for a, b in zip(ts, ts[1:])), name
        assert all(len(a.answer_space) <= len(b.answer_space) for a, b in zip(ts, ts[1:])), name

def test_levels_get_harder_in_the_intended_direction(levelled):
    L = levelled
    count = [L["count"][lv] for lv in LEVELS]
    assert _rising([max(int(s["answer"]) for s in ss) for ss in count])                              # more to count
    assert _falling([_mean(o["r"] for s in ss for o in s["meta"]["objects"]) for ss in count])         # smaller shapes
    assert _rising([_mean(len(s["meta"]["objects"]) - int(s["answer"]) for s in ss) for ss in count])  # more distractors
    assert max(len({o["shape"] for o in s["meta"]["objects"]}) for s in count[0]) == 2      # one other kind at level 0
    cp = [L["colour_position"][lv] for lv in LEVELS]
    assert _falling([_mean(o["r"] for s in ss for o in s["meta"]["objects"]) for ss in cp])
    assert [max(len(s["meta"].get("distractors", [])) for s in ss) for ss in cp] == [0, 0, 3, 6]
    bars = [L["bar_chart"][lv] for lv in LEVELS]
    assert _rising([max(int(s["answer"]) for s in ss) for ss in bars])
    assert _rising([_mean(len(s["meta"]["values"]) for s in ss) for ss in bars])
    assert _rising([make_task("bar_chart", level=lv).grid_step for lv in LEVELS])
    assert [{len(s["meta"]["digit_indices"]) for s in L["digit_sum"][lv]} for lv in LEVELS] == [{1}, {2}, {3}, {4}]
    letter_width = lambda s: (s["meta"]["box"][2] - s["meta"]["box"][0]) / len(s["answer"])
    assert _falling([_mean(letter_width(s) for s in L["small_word"][lv]) for lv in LEVELS])
    assert _rising([make_task("small_word", level=lv).n_decoys for lv in LEVELS])
    cmp = [L["compare_count"][lv] for lv in LEVELS]
    assert [len(ss[0]["images"]) for ss in cmp] == [2, 2, 3, 4]
    assert _rising([_mean(len(sc) for s in ss for sc in s["meta"]["scenes"]) for ss in cmp])
    assert _falling([_mean(o["r"] for s in ss[:40] for sc in s["meta"]["scenes"] for o in sc) for ss in cmp[1:]])
    video = [L["video_motion"][lv] for lv in LEVELS]
    assert [len(ss[0]["meta"]["objects"]) for ss in video] == [2, 3, 4, 6]
    travelled = lambda s: max(abs(o["xs"][-1] - o["xs"][0]) for o in s["meta"]["objects"])
    assert _falling([_mean(travelled(s) for s in ss) for ss in video[1:]])

@pytest.mark.parametrize("level", LEVELS)
def test_pixels_agree_with_the_scene_at_every_level(level, levelled):
    L = levelled
    for name in ("count", "compare_count"):
        for s in L[name][level][:30]:
            scenes = s["meta"]["scenes"] if name == "compare_count" else [s["meta"]["objects"]]
            assert [image_hash(draw_scene(o, 224)) for o in scenes] == [image_hash(im) for im in s["images"]]
    for s in L["bar_chart"][level][:60]:
        m, a = s["meta"], np.asarray(s["images"][0])
        g = chart_geometry(a.shape[1], len(m["values"])); ph = g["bottom"] - g["top"]
        for (x0, x1), v, c in zip(g["bars"], m["values"], m["colours"]):
            height = int((a[g["top"]:g["bottom"], (x0 + x1) // 2] == np.array(COLOURS[c])).all(1).sum())
            assert round(height / ph * m["max_value"]) == v
    for s in L["small_word"][level][:10]:
        label = word_label(s["meta"]["word"], s["meta"]["font_size"])
        assert image_hash(s["images"][0].crop(tuple(s["meta"]["box"]))) == image_hash(label)
    for s in L["video_motion"][level][:30]:
        f0, f1 = (np.asarray(s["images"][i]).astype(int) for i in (0, -1))
        mover = next(o for o in s["meta"]["objects"] if o["shape"] == s["answer"])
        assert {tuple(p) for p in f0[(f0 != f1).any(-1)]} <= {COLOURS[mover["colour"]], (246, 244, 238)}

@pytest.mark.parametrize("level", LEVELS)
def test_colour_position_answers_read_from_the_pixels(level, levelled):
    "The shape a question names is found by its colour and kind in the pixels, among the distractors too, and only once."
    for s in levelled["colour_position"][level]:
        a, m, q = np.asarray(s["images"][0]), s["meta"], question_text(s)
        every = m["objects"] + m.get("distractors", [])
        assert all(tuple(a[o["y"], o["x"]]) == COLOURS[o["colour"]] for o in every)
        assert image_hash(draw_scene(every, 224)) == image_hash(s["images"][0])
        third = lambda o: ("left", "middle", "right")[o["x"] * 3 // 224]
        if q.startswith("What colour"):
            kind, pos = re.match(r"What colour is the (\w+) on the (\w+)\?", q).groups()
            fits = [o for o in every if (kind == "shape" or o["shape"] == kind) and third(o) == pos]
            assert len(fits) == 1 and COLOURS[s["answer"]] == tuple(a[fits[0]["y"], fits[0]["x"]])
        else:
            colour, kind = re.match(r"Where is the (\w+) (\w+)\?", q).groups()
            fits = [o for o in every if tuple(a[o["y"], o["x"]]) == COLOURS[colour] and o["shape"] == kind]
            assert len(fits) == 1 and third(fits[0]) == s["answer"]

def test_levels_are_checked_and_keywords_override_them():
    with pytest.raises(ValueError, match=r"unknown level 4 for task 'count'; its levels are \[0, 1, 2, 3\]"):
        make_task("count", level=4)
    with pytest.raises(ValueError, match="unknown level True"): make_task("count", level=True)
    t = make_task("count", level=3, max_count=4)
    assert (t.max_count, t.cells, t.level, t.overrides, t.chance) == (4, 6, 3, {"max_count": 4}, 0.25)
    assert t.answer_space == ("1", "2", "3", "4")
    assert t.sample(0)["meta"]["level"] == 3 and "level=3, max_count=4," in repr(t)
    assert make_task("colour_position", radius=[.1, .2]).radius == (.1, .2)            # YAML gives lists
    assert make_task("bar_chart", level=0, n_bars=[2, 4]).n_bars == (2, 4)
    for call, msg in [(lambda: ShapeCount(level=3, cells=4), "cells²"), (lambda: ShapeCount(n_kinds=7), "n_kinds"),
                      (lambda: ColourPosition(radius=(.2, .1)), "radius"),
                      (lambda: ColourPosition(n_distractors=-1), "n_distractors"),
                      (lambda: BarChart(grid_step=0), "grid_step"), (lambda: DigitSum(n_digits=0), "n_digits"),
                      (lambda: SmallWord(size=128, font_size=40), "image"), (lambda: SmallWord(n_decoys=-1), "n_decoys"),
                      (lambda: CompareCount(n_images=4, max_count=3), "max_count must be >= n_images"),
                      (lambda: CompareCount(max_count=14), "cells²"), (lambda: VideoMotion(n_objects=7), "n_objects"),
                      (lambda: VideoMotion(travel=(.5, .2)), "travel"),
                      (lambda: VideoMotion(size=32, travel=(.01, .02)), "could travel only")]:
        with pytest.raises(ValueError, match=msg): call()

def test_digit_sum_chance_is_the_most_likely_sum():
    for n in (1, 2, 3, 4):
        sums = Counter(sum(d) for d in itertools.product(range(10), repeat=n))
        assert DigitSum(n_digits=n).chance == max(sums.values()) / 10 ** n

# --- dense captions ---------------------------------------------------------------------------------------------------

def _caption_pairs(name):
    "(question task, caption task, question sample, caption sample) at every level and split, a few indices each."
    n = 2 if name == "small_word" else 4
    for level in LEVELS:
        q, c = make_task(name, level=level), make_task(name, level=level, captions=True)
        for split in SPLITS:
            for i in range(n): yield q, c, q.sample(i, split), c.sample(i, split)

@pytest.mark.parametrize("name", list(TASKS))
def test_caption_samples_show_the_question_scene(name):
    for q, c, a, b in _caption_pairs(name):
        assert [image_hash(x) for x in b["images"]] == [image_hash(x) for x in a["images"]], b["id"]
        assert b["meta"] == dict(a["meta"], captioned=True) and "captioned" not in a["meta"]
        same = ("task", "split", "video")
        assert b["id"] == a["id"] + "/caption" and [b[k] for k in same] == [a[k] for k in same]
        user = user_prompt(CAPTION_PROMPT, len(a["images"]), a["video"])
        assert b["conversation"] == [{"role": "user", "content": user}, {"role": "assistant", "content": b["answer"]}]
        assert placeholders_match(b) and question_text(b) == CAPTION_PROMPT
        assert b["answer"] == q.describe(a["meta"]) and b["answer"].endswith(".") and len(b["answer"]) < 200
        assert c.verify(b) and q.verify(b) and q.verify(a) and c.verify(a), b["id"]
        assert not c.verify(dict(b, answer=b["answer"][:-1] + " x.")) and not q.verify(dict(b, answer=a["answer"]))
        assert c.check(" " + b["answer"].upper().rstrip("."), b["answer"])
        assert json.loads(json.dumps(b["meta"])) == b["meta"]
    assert c.chance == 0.0 and q.chance > 0 and c.answer_space == q.answer_space and c.level == q.level

def _answer_from_caption(name, caption, question, meta):
    "The answer to a question sample, read off the caption alone (and the question's text)."
    parts = caption.rstrip(".").split(", ")
    if name == "count":
        kind = re.match(r"How many (\w+)s are", question).group(1)
        return next((p.split()[0] for p in parts if p.split()[1].rstrip("s") == kind), "0")
    if name == "colour_position":
        triples = [p.split() for p in parts]
        if question.startswith("What colour"):
            kind, pos = re.match(r"What colour is the (\w+) on the (\w+)\?", question).groups()
            fits = [c for c, s, p in triples if (kind == "shape" or s == kind) and p == pos]
        else:
            colour, kind = re.match(r"Where is the (\w+) (\w+)\?", question).groups()
            fits = [p for c, s, p in triples if c == colour and s == kind]
        assert len(fits) == 1, (caption, question)
        return fits[0]
    if name == "bar_chart": return dict(p.split() for p in parts)[re.search(r"value of bar (\w)", question).group(1)]
    if name == "digit_sum": return str(sum(int(d) for d in caption.rstrip(".").split(" + ")))
    if name == "small_word": return caption.rstrip(".").split()[-1]
    if name == "compare_count":
        counts = [int(p.split(": ")[1].split()[0]) for p in parts]
        return f"Image-{counts.index(max(counts)) + 1}"
    if name == "video_motion": return caption.split()[0]

@pytest.mark.parametrize("name", list(TASKS))
def test_every_caption_answers_its_scenes_question(name):
    "The caption holds the answer to the question asked about the same scene, at every level."
    for q, c, a, b in _caption_pairs(name):
        read = _answer_from_caption(name, b["answer"], question_text(a), a["meta"])
        assert read == a["answer"], (b["answer"], question_text(a), a["answer"])

def test_captions_name_what_the_pixels_show():
    "count: every kind and its count, in SHAPES order; colour_position: every shape's colour at its centre, its third."
    for level in LEVELS:
        singular = {**{k: k for k in SHAPES}, **{k + "s": k for k in SHAPES}}
        for s in make_task("count", level=level, captions=True).stream("test", 30):
            objs = s["meta"]["objects"]
            assert image_hash(draw_scene(objs, 224)) == image_hash(s["images"][0])      # the scene is the picture
            n, pairs = Counter(o["shape"] for o in objs), [p.split() for p in s["answer"].rstrip(".").split(", ")]
            assert [singular[w] for _, w in pairs] == [k for k in SHAPES if n[k]], s["answer"]
            assert all(int(k) == n[singular[w]] and (w in SHAPES) == (k == "1") for k, w in pairs), s["answer"]
        for s in make_task("colour_position", level=level, captions=True).stream("test", 30):
            a, m = np.asarray(s["images"][0]), s["meta"]
            every = m["objects"] + m.get("distractors", [])
            triples = Counter(tuple(p.split()) for p in s["answer"].rstrip(".").split(", "))
            seen = Counter((next(c for c, rgb in COLOURS.items() if rgb == tuple(a[o["y"], o["x"]])), o["shape"],
                            ("left", "middle", "right")[o["x"] * 3 // 224]) for o in every)
            assert triples == seen, (s["answer"], seen)

def test_captions_by_hand():
    one = lambda shape, colour="red", x=0, y=0: dict(shape=shape, colour=colour, x=x, y=y, r=9)
    shapes = ("hexagon", "circle", "star", "hexagon", "circle", "hexagon")
    assert ShapeCount().describe(dict(objects=[one(k) for k in shapes])) == "2 circles, 1 star, 3 hexagons."
    main = [one("circle", "green", 110, 50), one("star", "red", 30, 90), one("square", "blue", 200, 20)]
    assert ColourPosition().describe(dict(objects=main)) == "red star left, green circle middle, blue square right."
    extra = [one("hexagon", "red", 40, 10), one("diamond", "blue", 220, 100)]
    assert (ColourPosition().describe(dict(objects=main, distractors=extra, size=224))
            == "red hexagon left, red star left, green circle middle, blue square right, blue diamond right.")
    assert BarChart().describe(dict(values=[3, 7, 0])) == "A 3, B 7, C 0."
    labels = load_digit_images()[1]
    first = lambda d: int(np.flatnonzero(labels == d)[0])
    assert DigitSum().describe(dict(digit_indices=[first(3), first(5)])) == "3 + 5."
    assert DigitSum().describe(dict(digit_indices=[first(7)])) == "7."
    assert SmallWord().describe(dict(word="cat")) == "The word is cat."
    scenes = [[one("circle")] * 3 + [one("star")], [one("circle")]]
    assert CompareCount().describe(dict(shape="circle", scenes=scenes)) == "Image-1: 3 circles, Image-2: 1 circle."
    moving = lambda shape, xs: dict(shape=shape, colour="red", xs=xs, y=0, r=9)
    objs = [moving("square", [5] * 3), moving("star", [5, 9, 13]), moving("circle", [40] * 3)]
    assert VideoMotion().describe(dict(objects=objs)) == "star moves; circle and square stay."

def test_the_captions_setting():
    for bad in ("yes", 1, 0, None, np.bool_(True)):
        with pytest.raises(ValueError, match="captions must be True or False"): make_task("count", captions=bad)
    for name, cls in TASKS.items():    # recipes check a task entry's keys against the signature
        params = list(inspect.signature(cls.__init__).parameters)
        assert params[-2:] == ["level", "captions"], name
        assert make_task(name, captions=False).captions is False and make_task(name, level=0, captions=True).captions
    t = ShapeCount(96, 2, 4, 1, 3, 3, 2)           # positional arguments keep their places
    got = (t.size, t.seed, t.max_count, t.max_distractors, t.cells, t.n_kinds, t.level, t.captions)
    assert got == (96, 2, 4, 1, 3, 3, 2, False)
    assert repr(make_task("bar_chart", level=3, max_value=12, captions=True)) == \
        "BarChart(size=224, seed=0, level=3, max_value=12, captions=True, chance=0.000)"
    with pytest.raises(ValueError, match="Task has no describe"): Task(captions=True)

def test_question_samples_are_unchanged_by_captions():
    "A digest of the text and scene of question samples (not the pixels), taken before captions existed."
    rows = [[s["id"], s["conversation"], s["answer"], s["meta"]]
            for name in TASKS for level in (None, 0, 3) for split in SPLITS
            for s in make_task(name, level=level).stream(split, 2 if name == "small_word" else 3)]
    assert hashlib.sha1(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == "63fd29409d62c958"
    for name in TASKS:                               # captions=False is the task without the setting
        a, b = make_task(name).sample(4, "test"), make_task(name, captions=False).sample(4, "test")
        assert [image_hash(x) for x in a["images"]] == [image_hash(x) for x in b["images"]]
        assert (a["id"], a["conversation"], a["meta"]) == (b["id"], b["conversation"], b["meta"])
        assert a["id"] == f"{name}/test/0/4"

def test_a_task_and_its_captions_mix_without_duplicate_ids():
    for name, level in (("count", None), ("colour_position", 2), ("video_motion", 3)):
        q, c = make_task(name, level=level), make_task(name, level=level, captions=True)
        mix = Mixture([(q, 1), (c, 0.5)], n=20, seed=0)
        ids = [s["id"] for s in mix]
        assert len(ids) == 30 == len(set(ids)) and sum(i.endswith("/caption") for i in ids) == 10
        assert {k: v["count"] for k, v in mix.counts.items()} == {name: 20, f"{name}#1": 10}
        by_id = {s["id"]: s for s in mix}
        for i in ids:
            if not i.endswith("/caption") and i + "/caption" in by_id:   # twins show the same scene
                assert by_id[i + "/caption"]["meta"] == dict(by_id[i]["meta"], captioned=True)

def test_captions_round_trip_through_datasets_and_refuse_the_blind_baseline():
    t = ColourPosition(level=3, captions=True)
    ds = to_dataset(t, "validation", 3)
    assert all(t.verify(r) and ColourPosition().verify(r) for r in ds)
    assert ds[1]["id"] == "colour_position/validation/0/1/caption" and json.loads(ds[1]["meta"])["captioned"] is True
    with pytest.raises(ValueError, match="is a caption"): blind_baseline(t.stream("train", 5), t.stream("test", 5))

# --- the image-blind baseline ------------------------------------------------------------------------------------------

def _qa(q, a, opts, qtype="q"):
    conv = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
    return dict(conversation=conv, answer=a, meta=dict(question_type=qtype, options=opts))

def test_blind_baseline_of_uniform_counts_is_chance_and_ln6():
    b = task_blind_baseline(make_task("count"), n_train=3000, n_test=1500)
    assert abs(b.accuracy - 1 / 6) < 3 * math.sqrt(1 / 6 * 5 / 6 / 1500) + 0.005, b
    assert abs(b.loss - math.log(6)) < 0.03 and b.uniform_loss == pytest.approx(math.log(6)) and b.unseen == 0, b
    assert (b.n_train, b.n_test) == (3000, 1500)

def test_blind_baseline_when_the_question_decides_the_answer():
    train = [_qa(f"What is {k} + 1?", str(k + 1), [str(i) for i in range(12)]) for k in range(10)] * 300
    b = blind_baseline(train, train[:100])
    assert b.accuracy == 1 and b.loss < 0.05 and b.unseen == 0          # p = 301 / 312 per question
    assert blind_baseline(train, train[:100], key=lambda s: "one question").accuracy == pytest.approx(0.1)

def test_blind_baseline_falls_back_on_the_question_type():
    train = [_qa("Q1", "a", ["a", "b"], "t")] * 3 + [_qa("Q2", "b", ["a", "b"], "t")]
    b = blind_baseline(train, [_qa("Q3", "a", ["a", "b"], "t"), _qa("Q4", "b", ["a", "b"], "other")])
    # Q3: type t counted a 3 times and b once, so p(a) = 4/6; Q4: its type was never seen: uniform, first option 'a' guessed
    assert b.unseen == 2 and b.accuracy == 0.5 and b.loss == pytest.approx(-(math.log(4 / 6) + math.log(1 / 2)) / 2)

def test_blind_baseline_reads_datasets_and_refuses_bad_input():
    ds = to_dataset(ShapeCount(), "train", 30)
    assert blind_baseline(ds, ds).n_test == 30 and isinstance(blind_baseline(ds, ds), BlindBaseline)
    for call, msg in [(lambda: blind_baseline([], ds), "needs train samples"),
                      (lambda: blind_baseline(ds, []), "needs test samples"),
                      (lambda: blind_baseline(ds, [_qa("Q", "7", ["1", "2"])]), "'7' is not one of its options"),
                      (lambda: task_blind_baseline(ShapeCount(), 10, 10, "train"), "split must be 'validation' or 'test'")]:
        with pytest.raises(ValueError, match=msg): call()

def _blind_accuracy_by_hand(samples):
    "The cross-fitted best option position per question type, counted directly (as before blind_baseline existed)."
    rows = [(s["meta"]["question_type"], s["meta"]["options"].index(s["answer"])) for s in samples]
    hits = 0
    for h in (0, 1):
        fit = {}
        for i, (q, pos) in enumerate(rows):
            if i % 2 != h: fit.setdefault(q, Counter())[pos] += 1
        best = {q: c.most_common(1)[0][0] for q, c in fit.items()}
        hits += sum(best.get(q, 0) == pos for i, (q, pos) in enumerate(rows) if i % 2 == h)
    return hits / len(rows)

def test_blind_accuracy_equals_the_direct_count(drawn, levelled):
    for name in TASKS:
        assert blind_accuracy(drawn[name]["train"]) == _blind_accuracy_by_hand(drawn[name]["train"]), name
        assert blind_accuracy(levelled[name][3]) == _blind_accuracy_by_hand(levelled[name][3]), name

# --- datasets ----------------------------------------------------------------------------------------------------------

def test_to_dataset_round_trip():
    t = VideoMotion(n_frames=4)
    ds = to_dataset(t, "test", 3)
    assert len(ds) == 3 and ds[0]["video"] is True and len(ds[0]["images"]) == 4
    row, s = ds[2], t.sample(2, "test")
    assert [image_hash(im.convert("RGB")) for im in row["images"]] == [image_hash(im) for im in s["images"]]
    assert json.loads(row["meta"]) == s["meta"] and t.verify(row) and row["conversation"] == s["conversation"]
    ds2 = to_dataset(Mixture([(ShapeCount(), 1), (BarChart(), 0.5)], n=4))
    assert Counter(ds2["task"]) == {"count": 4, "bar_chart": 2}

# --- mixtures ----------------------------------------------------------------------------------------------------------

@given(n=st.integers(0, 60), r=st.floats(0.01, 4.5), seed=st.integers(0, 1000))
@settings(max_examples=150, deadline=None)
def test_repeat_indices_counts(n, r, seed):
    idx = repeat_indices(n, r, np.random.default_rng(seed))
    whole, frac = int(r), r - int(r)
    assert len(idx) == whole * n + round(frac * n)
    c = Counter(idx.tolist())
    assert all(whole <= k <= whole + 1 for k in c.values()) and (whole == 0 or len(c) == n)
    assert (idx == repeat_indices(n, r, np.random.default_rng(seed))).all()

def test_mixture_of_tasks_lists_and_datasets():
    lst = [dict(ShapeCount().sample(i), id=f"L{i}") for i in range(10)]
    ds = to_dataset(BarChart(), "validation", 6)
    mix = Mixture([(ShapeCount(), 0.25), (lst, 2), (ds, 1.5)], n=20, split="test", seed=3)
    assert {k: v["count"] for k, v in mix.counts.items()} == {"count": 5, "source1": 20, "source2": 9}
    assert len(mix) == 34
    got = Counter(s["id"] for s in mix)
    assert all(got[f"L{i}"] == 2 for i in range(10))
    assert sum(v for k, v in got.items() if k.startswith("bar_chart/validation")) == 9
    assert all(k.startswith(("L", "bar_chart", "count/test/")) for k in got)
    again = Mixture([(ShapeCount(), 0.25), (lst, 2), (ds, 1.5)], n=20, split="test", seed=3)
    assert [s["id"] for s in again] == [s["id"] for s in mix]
    assert [s["id"] for s in Mixture([(ShapeCount(), 0.25), (lst, 2), (ds, 1.5)], n=20, split="test", seed=4)] != [s["id"] for s in mix]
    assert "source1" in mix.report()

# --- filters -----------------------------------------------------------------------------------------------------------

def test_repetition_score_by_hand():
    assert repetition_score(" ".join(f"w{i}" for i in range(30))) == 0
    # 11 words "a b ... j a": the only 10-grams are (a..j) and (b..j a): both distinct
    assert repetition_score("a b c d e f g h i j a") == 0
    # the 10-word phrase three times: 21 grams, all repeated
    assert repetition_score(" ".join(["a b c d e f g h i j"] * 3)) == 1
    # 20 distinct words then the first 10 again: grams 0 and 20 repeat; 2 of 21
    words = [f"w{i}" for i in range(20)] + [f"w{i}" for i in range(10)]
    assert repetition_score(" ".join(words)) == pytest.approx(2 / 21)
    assert repetition_score("short text") == 0

def test_filters_report_every_reason_and_keep_datasets(tmp_path):
    ok = list(ShapeCount().stream("train", 5))
    (tmp_path / "bad.png").write_bytes(b"nope")
    bad = [dict(ok[0], id="long", conversation=[ok[0]["conversation"][0], {"role": "assistant", "content": "x" * 50}]),
           dict(ok[1], id="path", images=[str(tmp_path / "bad.png")]),
           dict(ok[2], id="loop", conversation=[ok[2]["conversation"][0], {"role": "assistant", "content": "one two three four five six seven eight nine ten " * 5}])]
    kept, rep = apply_filters(ok[3:] + bad, [repetition_filter(0.4), heuristic_filter(max_answer_chars=40)])  # first reason wins
    assert rep.reasons == Counter({"answer longer than 40 chars": 1, "image failed to load": 1, "repetition > 0.4": 1})
    assert rep.n_in == 5 and rep.n_out == 2 and [i for i, _ in rep.removed] == ["long", "path", "loop"]
    ds = to_dataset(ShapeCount(), "train", 6)
    kept, rep = apply_filters(ds, [score_filter(lambda s: int(s["answer"]), 3, name="count")])
    assert type(kept).__name__ == "Dataset" and all(int(a) >= 3 for a in kept["answer"])
    assert rep.n_out == len(kept) and rep.reasons["count score < 3"] == 6 - len(kept)
    with pytest.raises(ValueError, match="no samples left after filtering all 6"):
        apply_filters(ds, [score_filter(lambda s: 0.0, 0.5)])

# --- loss weights ------------------------------------------------------------------------------------------------------

def _batch(lengths, pad=3, T=None):
    T = T or max(lengths) + 2 * pad
    lab = torch.full((len(lengths), T), -100)
    for i, L in enumerate(lengths): lab[i, pad:pad + L] = torch.arange(L) % 7
    return lab

def test_weights_by_hand():
    lab = _batch([1, 4, 9, 0])
    x = torch.tensor([1., 4, 9, 0])
    for mode, w in [("token", x.clamp(max=1) * 0 + 1), ("sample", 1 / x), ("square", 1 / x.sqrt())]:
        lw = loss_weights(lab, mode)
        for i in range(3): assert torch.allclose(lw[i][lab[i] != -100], w[i].expand(int(x[i])))
        assert (lw[lab == -100] == 0).all() and (lw[3] == 0).all()
    assert torch.allclose(loss_weights(lab, "sample").sum(1), torch.tensor([1., 1, 1, 0]))
    assert torch.allclose(loss_weights(lab, "square").sum(1), torch.tensor([1., 2, 3, 0]))

@given(lengths=st.lists(st.integers(0, 12), min_size=1, max_size=6), mode=st.sampled_from(["token", "sample", "square"]),
       gap=st.integers(0, 3))
@settings(max_examples=100, deadline=None)
def test_packed_weights_equal_unpacked(lengths, mode, gap):
    "Samples packed into one row (with prompt tokens between them) get the weights they get one per row."
    rows = _batch(lengths, pad=gap)
    packed, ids = [], []
    for i, r in enumerate(rows): packed.append(r); ids.append(torch.full_like(r, i))
    packed, ids = torch.cat(packed)[None], torch.cat(ids)[None]
    w_rows, w_pack = loss_weights(rows, mode), loss_weights(packed, mode, ids)
    assert torch.allclose(w_pack[0], w_rows.reshape(-1))
    # two packed rows reusing the same sample numbers stay separate
    two = loss_weights(torch.cat([packed, packed]), mode, torch.cat([ids, ids]))
    assert torch.allclose(two, torch.cat([w_pack, w_pack]))
    assert torch.equal(supervised_counts(packed, ids)[0], supervised_counts(rows).reshape(-1))

@given(lengths=st.lists(st.integers(0, 10), min_size=1, max_size=5), seed=st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_token_mode_is_plain_mean_ce(lengths, seed):
    lab = _batch(lengths)
    if (lab[:, 1:] != -100).sum() == 0: return
    logits = torch.randn(*lab.shape, 7, generator=torch.Generator().manual_seed(seed))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 7), lab[:, 1:].reshape(-1))
    assert torch.allclose(weighted_loss(logits, lab, mode="token"), ref, atol=1e-6)

def test_weighted_loss_by_hand_and_gradients():
    lab = _batch([1, 4])
    ce = torch.zeros(lab.shape); ce[0, 3] = 2.; ce[1, 3:7] = torch.tensor([1., 1, 1, 9])
    assert weighted_loss(ce, lab, mode="token").item() == pytest.approx(14 / 5)
    assert weighted_loss(ce, lab, mode="sample").item() == pytest.approx((2 + 12 / 4) / 2)
    assert weighted_loss(ce, lab, mode="square").item() == pytest.approx((2 + 12 / 2) / 3)
    assert weighted_loss(ce, lab, mode="square", global_denominator=6.).item() == pytest.approx(8 / 6)
    logits = torch.randn(2, lab.shape[1], 5, requires_grad=True)
    empty = torch.full_like(lab, -100)
    z = weighted_loss(logits, empty); z.backward()
    assert z.item() == 0 and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="do not match"): weighted_loss(ce, lab, weights=torch.ones(2, 3))
    with pytest.raises(ValueError, match="sample_ids"): loss_weights(lab, "square", sample_ids=torch.zeros(1, 3))
    with pytest.raises(ValueError, match="unknown loss mode"): loss_weights(lab, "per_token")

@given(lengths=st.lists(st.integers(0, 9), min_size=2, max_size=8), ranks=st.integers(2, 4), mode=st.sampled_from(["token", "sample", "square"]))
@settings(max_examples=80, deadline=None)
def test_global_denominator_matches_one_big_batch(lengths, ranks, mode):
    lab = _batch(lengths)
    if (lab != -100).sum() == 0: return
    ce = torch.rand(lab.shape)
    parts = [p for p in torch.arange(len(lengths)).tensor_split(ranks) if len(p)]
    ws = [loss_weights(lab[p], mode) for p in parts]
    den = torch.stack([w.sum() for w in ws]).sum() / len(parts)
    per_rank = [weighted_loss(ce[p], lab[p], w, global_denominator=den) for p, w in zip(parts, ws)]
    assert torch.allclose(sum(per_rank) / len(parts), weighted_loss(ce, lab, mode=mode), atol=1e-6)

def test_mean_across_ranks_on_two_gloo_processes(tmp_path):
    "Two real processes (gloo): each divides by mean_across_ranks(Σw); the averaged loss equals the one-process loss."
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(f"""
        import torch, torch.distributed as dist, torch.multiprocessing as mp
        from mmlit.data import loss_weights, mean_across_ranks, weighted_loss
        def batch():
            g = torch.Generator().manual_seed(0)
            lab = torch.full((4, 12), -100); ce = torch.rand(4, 12, generator=g)
            for i, L in enumerate([1, 3, 6, 9]): lab[i, 2:2 + L] = 1
            return lab, ce
        def work(rank):
            dist.init_process_group("gloo", init_method="file://{tmp_path}/rdv", rank=rank, world_size=2)
            lab, ce = batch(); lab, ce = lab[2 * rank:2 * rank + 2], ce[2 * rank:2 * rank + 2]
            w = loss_weights(lab, "square")
            loss = weighted_loss(ce, lab, w, global_denominator=mean_across_ranks(w.sum()))
            dist.all_reduce(loss); loss /= 2
            if rank == 0: torch.save(loss, "{tmp_path}/loss.pt")
            dist.destroy_process_group()
        if __name__ == "__main__":
            mp.spawn(work, nprocs=2)
            lab, ce = batch()
            ref = weighted_loss(ce, lab, mode="square")
            got = torch.load("{tmp_path}/loss.pt", weights_only=True)
            assert torch.allclose(got, ref), (got, ref)
            print("OK", float(got), float(ref))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]
    assert mean_across_ranks(torch.tensor(2.5)) == 2.5


# --- packing -----------------------------------------------------------------------------------------------------------

from mmlit.data import PACK_STRATEGIES, check_packs, collate_packed, fits_rows, pack_indices, pack_stream, padding_fraction, take_rows

@given(sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 6)), min_size=0, max_size=30),
       max_tokens=st.integers(40, 120), max_tiles=st.one_of(st.none(), st.integers(6, 12)))
@settings(max_examples=200, deadline=None)
def test_pack_indices_is_first_fit_within_caps(sizes, max_tokens, max_tiles):
    lens, tiles = [n for n, _ in sizes], [t for _, t in sizes]
    packs = pack_indices(lens, max_tokens, tiles, max_tiles)
    assert sorted(i for p in packs for i in p) == list(range(len(sizes)))            # every sample exactly once
    cap_t = max_tiles if max_tiles is not None else 10**9
    for p in packs:
        assert p == sorted(p) and p                                                   # arrival order kept, no empty pack
        assert sum(lens[i] for i in p) <= max_tokens and sum(tiles[i] for i in p) <= cap_t
    where = {i: k for k, p in enumerate(packs) for i in p}
    for i in range(len(sizes)):                                                       # first fit: no earlier pack had room
        for k in range(where[i]):
            before = [j for j in packs[k] if j < i]
            assert sum(lens[j] for j in before) + lens[i] > max_tokens or sum(tiles[j] for j in before) + tiles[i] > cap_t
    assert fits_rows(sizes, len(packs), max_tokens, max_tiles) and (not packs or not fits_rows(sizes, len(packs) - 1, max_tokens, max_tiles))

def test_pack_indices_rejects_oversized_samples():
    with pytest.raises(ValueError, match=r"sample 2 has 50 tokens, more than max_tokens=40"): pack_indices([10, 20, 50], 40)
    with pytest.raises(ValueError, match=r"sample 0 has 7 image tiles, more than max_tiles=6"): pack_indices([10], 40, [7], 6)
    with pytest.raises(ValueError, match="lengths but"): pack_indices([10, 20], 40, [1])

def _fake_sample(n_text, tiles, seed, ctx=6, per_tile=4):
    "A processed-looking sample: text, then one image span per entry of `tiles`, supervised tail; tiles filled with its seed."
    g = torch.Generator().manual_seed(seed)
    parts, px = [torch.randint(10, 100, (n_text,), generator=g)], []
    for t in tiles:
        parts += [torch.tensor([4]), torch.full((t * per_tile,), ctx), torch.tensor([5])]
        px.append(torch.full((t, 3, 8, 8), float(seed)))
    ids = torch.cat(parts + [torch.randint(10, 100, (3,), generator=g)])
    labels = torch.full_like(ids, -100); labels[-3:] = ids[-3:]
    return dict(input_ids=ids, labels=labels, pixel_values=torch.cat(px) if px else torch.zeros(0, 3, 8, 8), num_tiles=list(tiles))

@given(specs=st.lists(st.tuples(st.integers(1, 12), st.lists(st.integers(1, 3), max_size=2)), min_size=1, max_size=8),
       strategy=st.sampled_from(PACK_STRATEGIES))
@settings(max_examples=100, deadline=None)
def test_collate_packed_keeps_samples_whole_and_tiles_in_token_order(specs, strategy):
    samples = [_fake_sample(n, t, seed=i) for i, (n, t) in enumerate(specs)]
    b = collate_packed(samples, pad_token_id=0, max_tokens=64, max_tiles=6, strategy=strategy)
    assert "attention_mask" not in b
    for i, s in enumerate(samples):
        r, at = (b["sample_ids"] == i).nonzero(as_tuple=True)
        assert len(set(r.tolist())) == 1 and (at.diff() == 1).all()                   # one row, contiguous
        assert torch.equal(b["input_ids"][r, at], s["input_ids"]) and torch.equal(b["position_ids"][r, at], torch.arange(len(at)))
        assert b["labels"][r[0], at[0]] == -100 and torch.equal(b["labels"][r, at][1:], s["labels"][1:])
    pad = b["sample_ids"] == -1
    assert (b["labels"][pad] == -100).all() and (b["input_ids"][pad] == 0).all()
    # the tiles come in the order their <IMG_CONTEXT> tokens appear, row by row: what masked_scatter expects
    owner = b["sample_ids"][b["input_ids"] == 6].reshape(-1, 4)[:, 0]
    assert torch.equal(owner.float(), b["pixel_values"][:, 0, 0, 0])
    order = [int(i) for row in b["sample_ids"] for i in row.unique_consecutive() if i >= 0]   # samples in row-major order
    assert b["num_images"].tolist() == [len(samples[i]["num_tiles"]) for i in order]
    assert b["num_tiles"].tolist() == [t for i in order for t in samples[i]["num_tiles"]]
    assert padding_fraction(b) == pytest.approx(pad.float().mean().item())

def test_pack_stream_fills_rows_in_order():
    samples = [_fake_sample(n, [1], seed=i) for i, n in enumerate([30, 5, 18, 40, 2, 25, 9, 33, 12, 1])]
    batches = list(pack_stream(samples, 0, rows=2, max_tokens=64, max_tiles=3))
    counts = [int(b["sample_ids"].max()) + 1 for b in batches]
    starts = [sum(counts[:k]) for k in range(len(counts) + 1)]
    assert starts[-1] == len(samples) and len(batches) > 2 and all(b["input_ids"].shape[0] <= 2 for b in batches)
    size = lambda s: (len(s["input_ids"]), sum(s["num_tiles"]))
    for k, b in enumerate(batches):
        for i in range(counts[k]):       # batch k holds samples starts[k] .. starts[k+1]-1, in order
            r, at = (b["sample_ids"] == i).nonzero(as_tuple=True)
            assert torch.equal(b["input_ids"][r, at], samples[starts[k] + i]["input_ids"])
        if k + 1 < len(batches):          # the sample opening the next batch did not fit into this one
            assert not fits_rows([size(s) for s in samples[starts[k]:starts[k + 1] + 1]], 2, 64, 3)
    with pytest.raises(ValueError, match="more than max_tokens=20"): list(pack_stream(samples, 0, rows=2, max_tokens=20))

@given(sizes=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 6)), min_size=0, max_size=30),
       max_tokens=st.integers(40, 120), max_tiles=st.one_of(st.none(), st.integers(6, 12)))
@settings(max_examples=200, deadline=None)
def test_best_fit_decreasing_within_caps(sizes, max_tokens, max_tiles):
    lens, tiles = [n for n, _ in sizes], [t for _, t in sizes]
    packs = pack_indices(lens, max_tokens, tiles, max_tiles, strategy="best_fit_decreasing")
    check_packs(packs, lens, tiles, max_tokens, max_tiles)                            # every sample once, within the caps
    assert all(p == sorted(p) and p for p in packs) and [p[0] for p in packs] == sorted(p[0] for p in packs)
    assert len(packs) >= -(-sum(lens) // max_tokens)
    if max_tiles is None:   # any-fit: two packs at most half full would have been one
        assert sum(sum(lens[i] for i in p) <= max_tokens / 2 for p in packs) <= 1

def test_pack_indices_best_fit_by_hand():
    assert pack_indices([3, 8, 2, 7], 10, strategy="best_fit_decreasing") == [[0, 3], [1, 2]]   # 8+2, 7+3
    assert pack_indices([3, 8, 2, 7], 10) == [[0, 2], [1], [3]]                                 # first fit: 3+2, 8, 7
    assert pack_indices([6, 5, 4, 4], 10, [1, 1, 1, 1], 1, strategy="best_fit_decreasing") == [[0], [1], [2], [3]]  # the tile cap rules
    with pytest.raises(ValueError, match="unknown packing strategy"): pack_indices([1], 10, strategy="worst_fit")
    assert take_rows([(3, 0), (8, 0), (2, 0), (7, 0), (5, 0)], rows=2, max_tokens=10) == [[0, 3], [1, 2]]

def test_collate_packed_checks_given_packs():
    samples = [_fake_sample(n, [1], seed=i) for i, n in enumerate([10, 20, 30])]
    b = collate_packed(samples, 0, max_tokens=64, packs=[[0, 2], [1]])
    assert b["input_ids"].shape[0] == 2 and set(b["sample_ids"][0].unique().tolist()) == {0, 2} and -1 in b["sample_ids"][1]
    with pytest.raises(ValueError, match="exactly once"): collate_packed(samples, 0, 64, packs=[[0, 1]])
    with pytest.raises(ValueError, match="exactly once"): collate_packed(samples, 0, 64, packs=[[0, 1, 1], [2]])
    with pytest.raises(ValueError, match="row 0 holds"): collate_packed(samples, 0, 40, packs=[[0, 2], [1]])
    with pytest.raises(ValueError, match="row 1 holds .* 2 tiles"): collate_packed(samples, 0, 200, max_tiles=1, packs=[[0], [1, 2]])

@given(lens=st.lists(st.integers(1, 60), min_size=1, max_size=40), rows=st.integers(1, 3), buffer=st.integers(1, 12))
@settings(max_examples=60, deadline=None)
def test_pack_stream_with_buffer(lens, rows, buffer):
    "Best-fit over a lookahead buffer: every sample once and whole, rows within the caps, no sample waits more than `buffer` batches."
    samples = [_fake_sample(n, [1], seed=i) for i, n in enumerate(lens)]
    key = {tuple(s["input_ids"].tolist()): i for i, s in enumerate(samples)}
    seen = {}
    for k, b in enumerate(pack_stream(samples, 0, rows=rows, max_tokens=80, max_tiles=3, buffer=buffer)):
        assert b["input_ids"].shape[0] <= rows and b["input_ids"].shape[1] <= 80
        for r in range(b["input_ids"].shape[0]):
            assert int((b["input_ids"][r] == 6).sum()) <= 3 * 4                       # tiles per row (4 tokens each) within the cap
        for j in range(int(b["sample_ids"].max()) + 1):
            r, at = (b["sample_ids"] == j).nonzero(as_tuple=True)
            i = key[tuple(b["input_ids"][r, at].tolist())]
            assert i not in seen and torch.equal(b["position_ids"][r, at], torch.arange(len(at)))
            seen[i] = k
    assert sorted(seen) == list(range(len(lens)))
    assert all(k <= max(i, buffer - 1) for i, k in seen.items())
    with pytest.raises(ValueError, match="buffer >= 0"): list(pack_stream(samples, 0, rows=1, max_tokens=80, buffer=-1))

@pytest.fixture(scope="module")
def packed_setup():
    from mmlit.processing import MMProcessor
    from mmlit.model import tiny_config
    proc = MMProcessor.from_vision_config(tiny_config().vision_config, max_num=2)
    raw = [make_task("compare_count", n_images=3).sample(0), make_task("count").sample(1), make_task("video_motion", n_frames=3).sample(2),
           make_task("colour_position").sample(3)]
    return proc, [proc.process(s["conversation"], **media(s)) for s in raw]

@pytest.mark.parametrize("llm", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_logits_alone(packed_setup, llm, attn):
    "transformers' packed-sequence detection (position ids, no attention mask, no cache) isolates the samples of a row."
    from mmlit.core import seed_everything
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    proc, processed = packed_setup
    seed_everything(1); m = MMModel(tiny_config(text_model_type=llm, vision_hidden=64, text_hidden=64)).eval()
    fit_to_tokenizer(m, proc.tokenizer); m.set_attn_implementation(attn)
    b = collate_packed(processed, proc.pad_token_id, max_tokens=400)
    assert b["input_ids"].shape[0] < len(processed)                                   # some samples really share a row
    with torch.no_grad():
        out = m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], position_ids=b["position_ids"], use_cache=False).logits
        default = m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], position_ids=b["position_ids"]).logits
        assert torch.equal(out, default)            # MMModel turns the cache off for packed rows by itself
        for i, p in enumerate(processed):
            alone = m(input_ids=p["input_ids"][None], pixel_values=p["pixel_values"]).logits[0]
            r, at = (b["sample_ids"] == i).nonzero(as_tuple=True)
            assert torch.allclose(out[r, at], alone, atol=1e-4), (i, (out[r, at] - alone).abs().max())

@pytest.mark.parametrize("mode", ["token", "sample", "square"])
def test_packed_loss_and_gradients_equal_padded(packed_setup, mode):
    from mmlit.core import seed_everything
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    proc, processed = packed_setup
    seed_everything(2); m = MMModel(tiny_config(vision_hidden=64, text_hidden=64)); fit_to_tokenizer(m, proc.tokenizer)
    pad, pk = proc.collate(processed), collate_packed(processed, proc.pad_token_id, max_tokens=400)
    grads = []
    for b, kw in ((pad, dict(attention_mask=pad["attention_mask"])), (pk, dict(position_ids=pk["position_ids"]))):
        m.zero_grad()
        logits = m(input_ids=b["input_ids"], pixel_values=b["pixel_values"], use_cache=False, **kw).logits
        loss = weighted_loss(logits, b["labels"], mode=mode, sample_ids=b.get("sample_ids")); loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for a, z in zip(grads[0][1], grads[1][1]): assert torch.allclose(a, z, atol=1e-5, rtol=1e-4)
