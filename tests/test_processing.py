"""Integration and property tests for mmlit.processing (the one path from conversations + images to model inputs)."""
import functools, json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from mmlit.processing import (IGNORE_INDEX, IMAGE_TOKENS, IMG_CONTEXT, IMG_END, IMG_START, IM_END, IM_START, JPEG_MIN_TILE,
                              MMProcessor, add_mm_tokens, build_tiny_tokenizer, check_conversation, image_pixels,
                              jpeg_applies, random_jpeg, render_chat,
                              tiny_tokenizer, tiny_tokenizer_path, tokens_per_tile)
from mmlit.tiling import IMAGENET_MEAN, IMAGENET_STD, plan_tiles, tile_image, tiles_to_tensor

S, TPT = 28, 4  # tiny tiles keep every test fast


@functools.lru_cache(None)
def _gpt2_backend():
    "A GPT-2-style byte-level BPE transformers tokenizer, trained locally (no download)."
    bt = Tokenizer(models.BPE()); bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bt.decoder, bt.post_processor = decoders.ByteLevel(), processors.ByteLevel(trim_offsets=False)
    text = ["the quick brown fox jumps over the lazy dog", "There are 3 red circles.", "What colour is it?"] * 50
    bt.train_from_iterator(text, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return bt


def gpt2_like():
    "A fresh GPT-2-style transformers tokenizer around the cached local byte-level BPE."
    return PreTrainedTokenizerFast(tokenizer_object=_gpt2_backend(), bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def photo(w=90, h=40, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def proc(): return MMProcessor(image_size=S, tokens_per_tile=TPT, max_num=4)


@pytest.fixture(scope="module")
def gproc(): return MMProcessor(gpt2_like(), image_size=S, tokens_per_tile=TPT, max_num=4)


@pytest.fixture(scope="module")
def jproc(): return MMProcessor(image_size=S, tokens_per_tile=TPT, max_num=4, jpeg_min_tile=0)  # JPEG on every tile, as InternVL


QA = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]},
         {"role": "assistant", "content": "There are 3 circles."}, {"role": "user", "content": "And squares?"},
         {"role": "assistant", "content": [{"type": "text", "text": "2 squares."}]}]


def supervised_text(p, labels):
    return p.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False)


def image_spans(p, ids):
    "(start, end) token positions of every <img> ... </img> span."
    starts = (ids == p.img_start_token_id).nonzero().flatten().tolist()
    ends = (ids == p.img_end_token_id).nonzero().flatten().tolist()
    assert len(starts) == len(ends)
    return list(zip(starts, ends))


# ---------------------------------------------------------------- placeholders and bad input
@pytest.mark.parametrize("conv,images,want,given", [
    (QA, [], 1, 0), (QA, [photo(), photo()], 1, 2),
    ([{"role": "user", "content": "<image><image> compare"}], [photo()], 2, 1),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "image", "image": photo()}]}], [photo()], 2, 1)])
def test_placeholder_count_mismatch_names_both_counts(proc, conv, images, want, given):
    with pytest.raises(ValueError, match=f"{want} <image> placeholder.*but {given} image"):
        proc(conv, images=images)


def test_video_count_mismatch_and_batch_index(proc):
    with pytest.raises(ValueError, match="1 <video> placeholder.*but 0 video"):
        proc([{"role": "user", "content": "<video> what?"}])
    with pytest.raises(ValueError, match="conversation 1: .*1 <image> placeholder.*but 0 image"):
        proc([QA, QA], images=[[photo()], []])
    with pytest.raises(ValueError, match="one entry per conversation"):
        proc([QA, QA], images=[[photo()]])


@pytest.mark.parametrize("conv,msg", [
    ([], "empty conversation"), ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user", "content": 7}], "must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "text", "text": 7}]}], "text must be a string"),
    ([{"role": "user"}], "must be a dict with 'role' and 'content'"),
    ([{"role": "assistant", "content": "hi"}], "message 0 is 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system turn may only come first"),
    ([{"role": "system", "content": "a"}], "only a system turn"),
    ([{"role": "user", "content": "see <img> here"}], "reserved image token"),
])
def test_bad_conversations(conv, msg):
    with pytest.raises(ValueError, match=msg): check_conversation(conv)


def test_generation_prompt_after_assistant_refused(proc):
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        proc(QA, images=photo(), add_generation_prompt=True)


def test_corrupt_and_missing_images(proc, tmp_path):
    bad = tmp_path / "broken.png"; bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png"): proc(QA, images=str(bad))
    with pytest.raises(ValueError, match="nothing.jpg"): proc(QA, images=str(tmp_path / "nothing.jpg"))
    with pytest.raises(ValueError): proc(QA, images=3.5)
    with pytest.raises(ValueError, match="non-empty list of frames"):
        proc([{"role": "user", "content": "<video>?"}], videos=[[]])


def test_image_paths_and_files_load(proc, tmp_path):
    f = tmp_path / "p.png"; photo().save(f)
    a, b, c = proc(QA, images=photo()), proc(QA, images=str(f)), proc(QA, images=open(f, "rb"))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_values"], c["pixel_values"])


def test_unsupported_rules_and_settings():
    with pytest.raises(ValueError, match="not supported by MMProcessor"): MMProcessor(tile_rule="hd")
    with pytest.raises(ValueError, match="truncation must be"): MMProcessor(truncation="left")
    with pytest.raises(ValueError, match="placeholders"): MMProcessor(system_prompt="look at <image>")
    with pytest.raises(ValueError, match="multiple of patch_size"): tokens_per_tile(450, 14)


# ---------------------------------------------------------------- tokenizers
TOKENIZERS = {"tiny": tiny_tokenizer(), "gpt2-like": gpt2_like()}
add_mm_tokens(TOKENIZERS["gpt2-like"])


@pytest.mark.parametrize("name", list(TOKENIZERS))
@given(left=st.text(max_size=12), right=st.text(max_size=12), tok_name=st.sampled_from(IMAGE_TOKENS + (IM_START, IM_END)))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_special_tokens_are_atomic(name, left, right, tok_name):
    tok = TOKENIZERS[name]
    tid = tok.convert_tokens_to_ids(tok_name)
    assert tok(tok_name, add_special_tokens=False)["input_ids"] == [tid]
    ids = tok(left + tok_name + right, add_special_tokens=False)["input_ids"]
    n_in_sides = sum(left.count(t) + right.count(t) for t in [tok_name])
    assert ids.count(tid) == 1 + n_in_sides


def test_tiny_tokenizer_shipped_and_deterministic():
    tok = tiny_tokenizer()
    assert (len(tok), tok.pad_token, tok.bos_token, tok.eos_token) == (1536, "<|pad|>", "<|endoftext|>", IM_END)
    built = build_tiny_tokenizer()
    assert built.to_str() == build_tiny_tokenizer().to_str()
    assert Tokenizer.from_file(str(tiny_tokenizer_path())).get_vocab() == built.get_vocab()
    text = "There are 12 red circles. Überraschung! 🙂"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text   # byte-level: nothing is unknown


def test_add_mm_tokens_counts_new_rows():
    t = gpt2_like(); n0 = len(t)
    assert add_mm_tokens(t) == 5 and len(t) == n0 + 5 and add_mm_tokens(t) == 0
    assert t.pad_token == t.eos_token


@pytest.mark.parametrize("conv,gen,system", [(QA, False, None), (QA[:1], True, "Be brief."), (MULTI, False, None),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"}, {"type": "text", "text": "?"}]}], True, None)])
def test_jinja_template_matches_python_rendering(proc, conv, gen, system):
    kw = {"system_prompt": system} if system else {}
    assert proc.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **kw) == \
        render_chat(check_conversation(conv, gen), gen, system)[0]


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("which", ["proc", "gproc"])
def test_labels_only_on_assistant_turns(which, request):
    p = request.getfixturevalue(which)
    b = p([QA, MULTI], images=[[photo()], [photo(60, 80)]])
    assert supervised_text(p, b["labels"][0]) == "Red." + IM_END
    assert supervised_text(p, b["labels"][1]) == "There are 3 circles." + IM_END + "2 squares." + IM_END
    for i in range(2):   # nothing before the first assistant reply is supervised; image tokens never are
        ids, lab = b["input_ids"][i], b["labels"][i]
        first = (lab != IGNORE_INDEX).nonzero()[0].item()
        assert p.decode(ids[:first], skip_special_tokens=False).endswith(IM_START + "assistant\n")
        assert not torch.isin(lab, torch.tensor([p.img_context_token_id, p.img_start_token_id, p.img_end_token_id])).any()
        assert torch.equal(lab[lab != IGNORE_INDEX], ids[lab != IGNORE_INDEX])


def test_generation_prompt_has_no_labels_for_new_turn(proc):
    b = proc(MULTI[:4], images=photo(), add_generation_prompt=True)
    assert supervised_text(proc, b["labels"][0]) == "There are 3 circles." + IM_END
    hdr = proc.tokenizer(IM_START + "assistant\n", add_special_tokens=False)["input_ids"]
    assert b["input_ids"][0, -len(hdr):].tolist() == hdr


# ---------------------------------------------------------------- padding
def test_left_and_right_padding(proc):
    convs = [QA[:1], MULTI[:2], [{"role": "user", "content": "hi"}]]
    imgs = [[photo()], [photo(30, 30)], None]
    r = proc(convs, images=imgs, add_generation_prompt=True, padding_side="right")
    l = proc(convs, images=imgs, add_generation_prompt=True)                        # generation default: left
    assert r["input_ids"].shape == l["input_ids"].shape
    lengths = r["attention_mask"].sum(1)
    assert torch.equal(lengths, l["attention_mask"].sum(1)) and lengths.max() == r["input_ids"].shape[1]
    L = r["input_ids"].shape[1]
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(r["input_ids"][i, :n], l["input_ids"][i, L - n:])
        assert (r["input_ids"][i, n:] == proc.pad_token_id).all() and (l["input_ids"][i, :L - n] == proc.pad_token_id).all()
        assert r["attention_mask"][i, :n].all() and not r["attention_mask"][i, n:].any()
        assert l["attention_mask"][i, L - n:].all() and not l["attention_mask"][i, :L - n].any()
        assert (r["labels"][i, n:] == IGNORE_INDEX).all() and (l["labels"][i, :L - n] == IGNORE_INDEX).all()
    train = proc([QA, MULTI], images=[[photo()], [photo()]])                          # training default: right
    assert train["attention_mask"][:, 0].all()
    with pytest.raises(ValueError, match="padding_side"): proc(QA, images=photo(), padding_side="middle")
    assert proc(QA, images=photo(), pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0


# ---------------------------------------------------------------- truncation
@given(max_length=st.integers(1, 200), n_images=st.integers(1, 3))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_right_truncation_never_cuts_an_image_span(proc, max_length, n_images):
    conv = [{"role": "user", "content": "look " + " and ".join(["<image>"] * n_images) + " now"}, {"role": "assistant", "content": "ok then."}]
    imgs = [photo(30 + 20 * k, 40, seed=k) for k in range(n_images)]
    full = proc.process(conv, imgs)
    s = proc.process(conv, imgs, max_length=max_length, truncation="right")
    ids = s["input_ids"]
    assert len(ids) <= max_length and torch.equal(ids, full["input_ids"][:len(ids)])
    spans = image_spans(proc, ids)
    assert (ids == proc.img_context_token_id).sum() == sum(e - a - 1 for a, e in spans)
    assert [(e - a - 1) // TPT for a, e in spans] == s["num_tiles"] == full["num_tiles"][:len(spans)]
    assert len(s["pixel_values"]) == sum(s["num_tiles"])
    assert torch.equal(s["pixel_values"], full["pixel_values"][:len(s["pixel_values"])])
    if len(full["input_ids"]) > max_length:   # the cut lands at max_length, or just before the image it would split
        assert len(ids) == max_length or ids.numel() == 0 or full["input_ids"][len(ids)] == proc.img_start_token_id


def test_too_long_is_rejected_by_default(proc):
    n = len(proc.process(QA, photo())["input_ids"])
    with pytest.raises(ValueError, match=f"sample has {n} tokens, more than max_length=20"):
        proc(QA, images=photo(), max_length=20)
    with pytest.raises(ValueError, match="generation prompt"):
        proc(QA[:1], images=photo(), max_length=20, truncation="right", add_generation_prompt=True)
    assert len(proc.process(QA, photo(), max_length=n)["input_ids"]) == n


# ---------------------------------------------------------------- JPEG augmentation
def test_jpeg_reproducible_and_per_tile(jproc):
    proc, img = jproc, photo(90, 40, seed=3)
    a = proc(QA, images=img, train=True, seed=11)["pixel_values"]
    b = proc(QA, images=img, train=True, seed=11)["pixel_values"]
    c = proc(QA, images=img, train=True, seed=12)["pixel_values"]
    clean, clean2 = proc(QA, images=img)["pixel_values"], proc(QA, images=img)["pixel_values"]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, clean) and torch.equal(clean, clean2)
    tiles, qualities = random_jpeg(tile_image(img, **proc.tile_settings()), np.random.default_rng(11))
    assert torch.equal(tiles_to_tensor(tiles, S, IMAGENET_MEAN, IMAGENET_STD), a)      # one draw per tile, in order
    assert len(qualities) == len(a) and len(set(qualities)) > 1 and all(75 <= q <= 100 for q in qualities)
    qs = random_jpeg([img] * 2000, np.random.default_rng(0))[1]
    assert min(qs) == 75 and max(qs) == 100        # uniform over the inclusive range
    p2 = MMProcessor(image_size=S, tokens_per_tile=TPT, max_num=4, seed=5, jpeg_min_tile=0)
    p3 = MMProcessor(image_size=S, tokens_per_tile=TPT, max_num=4, seed=5, jpeg_min_tile=0)
    x2 = [p2(QA, images=img, train=True)["pixel_values"] for _ in range(2)]
    x3 = [p3(QA, images=img, train=True)["pixel_values"] for _ in range(2)]
    assert torch.equal(x2[0], x3[0]) and torch.equal(x2[1], x3[1]) and not torch.equal(x2[0], x2[1])


def count_scene(size):
    "A built-in count-task scene (small shapes on a plain background), the tiny models' kind of image."
    from mmlit.data import make_task
    return make_task("count", size=size).sample(0)["images"][0]


def test_small_tiles_are_never_jpeg_compressed(proc, jproc):
    "64-px tiles (the tiny models') stay clean with train=True by default; jpeg_min_tile=0 compresses them."
    p64 = MMProcessor(image_size=64, tokens_per_tile=16, max_num=4)
    j64 = MMProcessor(image_size=64, tokens_per_tile=16, max_num=4, jpeg_min_tile=0)
    img = count_scene(64)
    assert p64.jpeg_min_tile == JPEG_MIN_TILE == 224
    clean = p64(QA, images=img)["pixel_values"]
    for seed in (0, 1, None): assert torch.equal(p64(QA, images=img, train=True, seed=seed)["pixel_values"], clean)
    assert torch.equal(j64(QA, images=img)["pixel_values"], clean)
    assert not torch.equal(j64(QA, images=img, train=True, seed=0)["pixel_values"], clean)
    x = photo(90, 40, seed=4)        # the 28-px test processors: the same rule
    assert torch.equal(proc(QA, images=x, train=True, seed=0)["pixel_values"], proc(QA, images=x)["pixel_values"])
    assert not torch.equal(jproc(QA, images=x, train=True, seed=0)["pixel_values"], jproc(QA, images=x)["pixel_values"])


def test_large_tiles_are_jpeg_compressed():
    "A 448-px tile (InternVL 2.5's size) is compressed with train=True under the default setting."
    p = MMProcessor(image_size=448, tokens_per_tile=256, max_num=1)
    img = count_scene(448)
    a, clean = p(QA, images=img, train=True, seed=0)["pixel_values"], p(QA, images=img)["pixel_values"]
    assert a.shape == clean.shape == (1, 3, 448, 448) and not torch.equal(a, clean)
    assert torch.equal(a, p(QA, images=img, train=True, seed=0)["pixel_values"])


@pytest.mark.parametrize("min_tile, compressed", [(0, True), (S - 1, True), (S, True), (S + 1, False), (JPEG_MIN_TILE, False)])
def test_jpeg_min_tile_threshold_is_inclusive(min_tile, compressed):
    img, rng = photo(60, 30, seed=5), np.random.default_rng
    clean = image_pixels(img, image_size=S, max_num=2)
    got = image_pixels(img, image_size=S, max_num=2, rng=rng(0), jpeg_min_tile=min_tile)
    assert (not torch.equal(got, clean)) == compressed == jpeg_applies(S, min_tile)


@pytest.mark.parametrize("bad", [-1, -224, 2.5, "224", None, True])
def test_jpeg_min_tile_validated(bad):
    with pytest.raises(ValueError, match="jpeg_min_tile must be a non-negative int"):
        MMProcessor(image_size=S, tokens_per_tile=TPT, jpeg_min_tile=bad)


@pytest.mark.parametrize("min_tile", [0, 64, JPEG_MIN_TILE, 1000])
def test_jpeg_min_tile_round_trips(min_tile, tmp_path):
    p = MMProcessor(image_size=S, tokens_per_tile=TPT, max_num=4, jpeg_min_tile=min_tile)
    p.save_pretrained(tmp_path)
    assert json.loads((tmp_path / MMProcessor.config_name).read_text())["jpeg_min_tile"] == min_tile
    q = MMProcessor.from_pretrained(tmp_path)
    assert q.jpeg_min_tile == min_tile
    x = photo(90, 40, seed=6)
    assert torch.equal(p(QA, images=x, train=True, seed=2)["pixel_values"], q(QA, images=x, train=True, seed=2)["pixel_values"])
    assert MMProcessor.from_pretrained(tmp_path, jpeg_min_tile=7).jpeg_min_tile == 7


def test_processor_saved_before_jpeg_min_tile_loads_with_the_default(proc, tmp_path):
    proc.save_pretrained(tmp_path)
    f = tmp_path / MMProcessor.config_name
    cfg = json.loads(f.read_text()); del cfg["jpeg_min_tile"]; f.write_text(json.dumps(cfg))
    assert MMProcessor.from_pretrained(tmp_path).jpeg_min_tile == JPEG_MIN_TILE


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("which", ["proc", "gproc", "jproc"])
def test_save_load_round_trip(which, request, tmp_path):
    p = request.getfixturevalue(which)
    p.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / MMProcessor.config_name).read_text())
    assert cfg["tokens_per_tile"] == TPT and cfg["image_size"] == S
    q = MMProcessor.from_pretrained(tmp_path)
    args = dict(conversations=[QA, MULTI], images=[[photo()], [photo(50, 70)]], train=True, seed=3)
    x, y = p(**args), q(**args)
    assert set(x) == set(y)
    for k in x: assert torch.equal(x[k], y[k]), k
    assert q.to_dict() == p.to_dict() and len(q.tokenizer) == len(p.tokenizer)
    with pytest.raises(FileNotFoundError, match="no processor folder"): MMProcessor.from_pretrained(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not an mmlit processor directory"): MMProcessor.from_pretrained(tmp_path / "plain")


# ---------------------------------------------------------------- image-token accounting
@given(w=st.integers(1, 400), h=st.integers(1, 400), max_num=st.integers(1, 8), thumb=st.booleans(),
       tpt=st.sampled_from([1, 4, 9]), size=st.sampled_from([14, 28]))
@settings(max_examples=60, deadline=None)
def test_context_tokens_equal_tiles_times_tokens_per_tile(w, h, max_num, thumb, tpt, size):
    p = MMProcessor(TOKENIZERS["tiny"], image_size=size, tokens_per_tile=tpt, max_num=max_num, use_thumbnail=thumb)
    conv = [{"role": "user", "content": "<image>\nand <image>"}, {"role": "assistant", "content": "x"}]
    imgs = [Image.new("RGB", (w, h), "red"), Image.new("RGB", (h, w), "blue")]
    b = p(conv, images=imgs)
    ids = b["input_ids"][0]
    spans = image_spans(p, ids)
    assert len(spans) == 2 and b["num_tiles"].tolist() == [len(plan_tiles(*im.size, **p.tile_settings(2)).boxes) for im in imgs]
    for (a, e), n in zip(spans, b["num_tiles"].tolist()):
        assert e - a - 1 == n * tpt and (ids[a + 1:e] == p.img_context_token_id).all()
    assert (ids == p.img_context_token_id).sum() == b["num_tiles"].sum() * tpt
    assert b["pixel_values"].shape == (int(b["num_tiles"].sum()), 3, size, size)
    assert sum(p.num_image_tokens(*im.size, n_images=2) for im in imgs) == sum(e - a + 1 for a, e in spans)


def test_from_vision_config():
    from transformers import SiglipVisionConfig, CLIPVisionConfig
    assert MMProcessor.from_vision_config(SiglipVisionConfig(image_size=384, patch_size=16)).tokens_per_tile == 144
    p = MMProcessor.from_vision_config(CLIPVisionConfig(image_size=448, patch_size=14))
    assert (p.image_size, p.tokens_per_tile) == (448, 256)
    assert MMProcessor.from_vision_config({"image_size": 28, "patch_size": 14}, downsample_ratio=1.0).tokens_per_tile == 4
    with pytest.raises(ValueError, match="image_size and patch_size"): MMProcessor.from_vision_config({"image_size": 28})
    assert MMProcessor.from_vision_config({"image_size": (64, 64), "patch_size": (8, 8)}).tokens_per_tile == 16
    with pytest.raises(ValueError, match="not square"): MMProcessor.from_vision_config({"image_size": (64, 32), "patch_size": 8})


# ---------------------------------------------------------------- multi-image and video
def test_multi_image_prompt(proc):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "image", "image": photo(20, 20)}, {"type": "text", "text": "Same?"}]}]
    b = proc(conv, images=[photo(90, 40)], add_generation_prompt=True)
    text = proc.decode(b["input_ids"][0], skip_special_tokens=False).replace(IMG_CONTEXT, "")
    assert "Image-1: <img></img>\nImage-2: <img></img>\nSame?" in text
    assert b["num_tiles"].tolist() == [3, 1]            # budget 4 // 2 = 2 tiles each: (2,1)+thumbnail, and (1,1)
    assert b["num_images"].tolist() == [1 + 1] and b["image_flags"].sum() == 4


def test_video_prompt_and_frame_sampling(proc):
    frames = [photo(60, 40, seed=k) for k in range(5)]
    conv = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}]}]
    b = proc(conv, add_generation_prompt=True)
    text = proc.decode(b["input_ids"][0], skip_special_tokens=False).replace(IMG_CONTEXT, "")
    assert "".join(f"Frame-{i}: <img></img>\n" for i in range(1, 6)) + "What happens?" in text
    assert b["num_tiles"].tolist() == [1] * 5 and b["pixel_values"].shape == (5, 3, S, S)
    s = MMProcessor(image_size=S, tokens_per_tile=TPT, video_segments=3)
    b3 = s([{"role": "user", "content": "<video>\nWhat happens?"}], videos=[frames], add_generation_prompt=True)
    assert b3["num_tiles"].tolist() == [1] * 3
    mixed = proc([{"role": "user", "content": "<image> then <video>"}, {"role": "assistant", "content": "ok"}],
                 images=[photo()], videos=[frames[:2]])
    assert mixed["num_tiles"].tolist() == [3, 1, 1] and mixed["num_images"].tolist() == [3]


def test_text_only_batch_and_device_move(proc):
    b = proc([[{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}]] * 2)
    assert b["pixel_values"].shape == (0, 3, S, S) and b["num_tiles"].numel() == 0 and b["num_images"].tolist() == [0, 0]
    assert b.to("cpu")["input_ids"].device.type == "cpu"


def test_model_inputs_drop_bookkeeping(proc):
    b = proc(QA, images=photo())
    assert set(b) == {"input_ids", "attention_mask", "labels", "pixel_values", "image_flags", "num_tiles", "num_images"}
    assert set(proc.model_inputs(b)) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert set(proc.model_inputs(proc([{"role": "user", "content": "hi"}]), labels=False)) == {"input_ids", "attention_mask"}
