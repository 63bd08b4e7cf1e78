"Tests of mmlit.jigsaw: the graded reward, answer parsing, TRL-signature rewards, the tasks, the renderer, GRPO."
import itertools, math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from mmlit.data import TASKS, make_task, media
from mmlit.jigsaw import (JIGSAW_TASKS, DepthJigsaw, ImageJigsaw, VideoJigsaw, answer_position_nll, clip_times,
                          format_order, is_permutation, jigsaw_mixture, jigsaw_reward, jigsaw_reward_func,
                          order_format_reward, order_from_keys, parse_order,
                          project, render_depth_scene, place_objects)

torch.set_num_threads(1)
perms = st.integers(2, 9).flatmap(lambda k: st.permutations(list(range(k))))


# ---------------------------------------------------------------- the reward
@given(perms)
def test_exact_order_earns_one(truth):
    for variant in ("paper", "code"): assert jigsaw_reward(list(truth), list(truth), variant=variant) == 1.0


@given(perms, st.randoms(use_true_random=False), st.floats(0, 1))
def test_valid_non_exact_earns_gamma_share(truth, rnd, gamma):
    pred = list(truth); rnd.shuffle(pred)
    k, right = len(truth), sum(a == b for a, b in zip(pred, truth))
    expect = 1.0 if pred == list(truth) else gamma * right / k
    assert jigsaw_reward(pred, list(truth), gamma) == pytest.approx(expect)
    code = 1.0 if pred == list(truth) else (gamma * right / k if k > 4 else 0.0)
    assert jigsaw_reward(pred, list(truth), gamma, "code") == pytest.approx(code)
    if pred != list(truth): assert right <= k - 2   # a non-exact permutation misplaces at least two pieces


@given(perms, st.data())
def test_invalid_answers_earn_zero(truth, data):
    k = len(truth)
    i, j = data.draw(st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)).filter(lambda t: t[0] != t[1]))
    dup = list(truth)
    dup[i] = dup[j]
    out_of_range = list(truth)
    out_of_range[data.draw(st.integers(0, k - 1))] = data.draw(st.sampled_from([k, k + 3, -1]))
    for pred in (dup, out_of_range, list(truth)[:-1], list(truth) + [k], None, [], "0123"):
        for variant in ("paper", "code"): assert jigsaw_reward(pred, list(truth), variant=variant) == 0.0


def test_reward_rejects_bad_truth_and_variant():
    for bad in ([0, 0], [1, 2], [0], "01", None):
        with pytest.raises(ValueError, match="permutation"): jigsaw_reward([0, 1], bad)
    with pytest.raises(ValueError, match="unknown variant"): jigsaw_reward([0, 1], [0, 1], variant="released")


# ---------------------------------------------------------------- parsing
WRAPS = ["{}", "<answer>{}</answer>", "\\boxed{{{}}}", "[{}]", "  {}  ", "<answer>\\boxed{{{}}}</answer>"]


@given(perms, st.sampled_from(WRAPS),
       st.sampled_from([" ", ",", ", "]))
def test_parse_accepts_the_written_forms(order, wrap, sep):
    assert parse_order(wrap.format(sep.join(map(str, order)))) == list(order)


@pytest.mark.parametrize("text", ["the answer is 2 0 3 1", "2 0 3 1 I think", "2;0;3;1", "<answer>2 0 3 1", "a,b,c",
                                  "<answer></answer>", "", "   ", "2 0 3 1\n\nbecause", None, 7])
def test_parse_rejects_the_rest(text):
    assert parse_order(text) is None


def test_trl_signature_rewards():
    outs, ans = ["2,0,3,1", "2 0 1 3", "2 2 3 1", "no", "<answer>2,0,3,1</answer>"], ["2,0,3,1"] * 5
    assert jigsaw_reward_func()(["q"] * 5, outs, answer=ans) == pytest.approx([1.0, 0.1, 0.0, 0.0, 1.0])
    assert jigsaw_reward_func(gamma=0)(["q"] * 5, outs, answer=ans) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert jigsaw_reward_func(variant="code")(["q"] * 5, outs, answer=ans) == [1.0, 0.0, 0.0, 0.0, 1.0]
    assert order_format_reward(["q"] * 5, outs, answer=ans) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert jigsaw_reward_func()(["q"], ["0,1"], answer=[None]) == [None]
    with pytest.raises(ValueError, match="answer"): jigsaw_reward_func()(["q"], ["0,1"])
    with pytest.raises(ValueError, match="2 completions but 1"):
        order_format_reward(["q"] * 2, ["0,1"] * 2, answer=["0,1"])


# ---------------------------------------------------------------- tasks
def test_registered_as_built_in_tasks():
    for name in ("jigsaw_image", "jigsaw_video", "jigsaw_depth"): assert TASKS[name] is JIGSAW_TASKS[name]
    assert isinstance(make_task("jigsaw_image", level=0, source="scene"), ImageJigsaw)


@pytest.mark.parametrize("name", sorted(JIGSAW_TASKS))
@pytest.mark.parametrize("level", [0, 1])
def test_samples_verify_and_are_reproducible(name, level):
    t = make_task(name, level=level)
    for split in ("train", "test"):
        for i in range(4):
            s = t.sample(i, split)
            assert t.verify(s) and t.check(s["answer"], s["answer"])
            assert is_permutation(parse_order(s["answer"]), t.pieces)
            assert s["answer"] == make_task(name, level=level).sample(i, split)["answer"]
    assert t.chance == pytest.approx(1 / math.factorial(t.pieces))


def test_check_accepts_other_formats_and_rejects_wrong_orders():
    t = ImageJigsaw(level=0); a = t.sample(0)["answer"]; o = parse_order(a)
    assert t.check("<answer>" + " ".join(map(str, o)) + "</answer>", a)
    assert not t.check(format_order(o[::-1]), a) and not t.check("0,0,0,0", a)


def test_image_tiles_rebuild_the_picture():
    t = ImageJigsaw(level=0, source="scene", size=32)
    s = t.sample(5)
    from mmlit.jigsaw import procedural_picture
    from mmlit.data import sample_rng
    pic, _ = procedural_picture(sample_rng(t.name, "train", 5, 0), 64)
    order = parse_order(s["answer"])
    row = lambda r: np.concatenate([np.asarray(s["images"][order[r * 2 + c]]) for c in range(2)], 1)
    rebuilt = np.concatenate([row(0), row(1)], 0)
    assert (rebuilt == np.asarray(pic)).all()


def test_photo_splits_do_not_share_photos():
    photos = lambda split: {ImageJigsaw(level=0).sample(i, split)["meta"]["photo"] for i in range(30)}
    seen = {split: photos(split) for split in ("train", "test")}
    assert not seen["train"] & seen["test"]


def test_video_clips_are_trimmed_and_in_order():
    ct = clip_times(6, 3)
    for a, b in zip(ct, ct[1:]): assert b[0] - a[-1] == pytest.approx(2 * 0.05 / 6)
    s = VideoJigsaw(level=0).sample(3)
    times = s["meta"]["times"]
    assert [times[j][0] for j in parse_order(s["answer"])] == sorted(t[0] for t in times)
    assert media(s) == {"videos": [s["images"]]} and len(s["images"]) == 8


def test_depth_points_are_apart_and_ordered():
    t = DepthJigsaw()
    for i in range(6):
        m = t.sample(i)["meta"]; P, D = np.array(m["points"]), np.array(m["keys"])
        pairs = list(itertools.combinations(range(6), 2))
        assert min(np.hypot(*(P[a] - P[b])) for a, b in pairs) >= t.min_px
        assert min(abs(D[a] - D[b]) for a, b in pairs) > 0.2
        assert list(D[order_from_keys(list(D))]) == sorted(D)


def test_renderer_occlusion_and_perspective():
    near = dict(kind="sphere", x=0.0, z=4.0, r=.6, height=1.2, colour=(200, 0, 0))
    far = dict(near, z=8.0, colour=(0, 0, 200))
    img, depth, ids = render_depth_scene([far, near], 128)
    u, v = project(0, .6, 4.0, 128)
    assert ids[int(v), int(u)] == 1   # the near sphere hides the far one
    assert depth[int(v), int(u)] == pytest.approx(4.0 - .6, abs=.05)
    _, _, ids_far = render_depth_scene([far], 128)
    assert (ids_far == 0).sum() < (ids == 1).sum()   # twice as far: a smaller disc
    with pytest.raises(ValueError, match="points"): DepthJigsaw(points=7)


# ---------------------------------------------------------------- GRPO on a jigsaw, video prompts included
def test_grpo_runs_on_jigsaw_video_prompts(tmp_path):
    from mmlit.grpo import GRPOConfig, GRPOTrainer, rollout
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    from mmlit.processing import MMProcessor, tiny_tokenizer
    tok = tiny_tokenizer()
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                      vision_model_type="siglip_vision_model")
    torch.manual_seed(0); m = MMModel(cfg); fit_to_tokenizer(m, tok)
    proc = MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)
    tasks = [VideoJigsaw(level=0, size=32), ImageJigsaw(level=0, size=32)]
    groups = rollout(m, proc, [tasks[0].sample(0)], [jigsaw_reward_func()], group_size=2, max_new_tokens=4)
    assert groups[0].rewards.shape == (2, 1)
    c = GRPOConfig(output_dir=str(tmp_path), steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4, lr=1e-3,
                   progress=False, cpu=True)
    last = GRPOTrainer(m, proc, tasks, c, [jigsaw_reward_func(), order_format_reward]).train()
    assert last["step"] == 2 and "rewards/jigsaw_paper_reward/mean" in last
    nll = answer_position_nll(m, proc, list(tasks[0].stream("test", 3)))
    assert len(nll) == 4 and all(x > 0 for x in nll)   # one loss per place of a K = 4 answer


def test_training_mixture():
    mix = jigsaw_mixture(7)
    assert [t.pieces for t in mix.values()] == [4, 4, 4, 4, 9] and all(t.seed == 7 for t in mix.values())
    assert mix["scene 2x2"].source == "scene" and mix["video K=4"].video


# ---------------------------------------------------------------- the legible cue, the repetition penalty, the warm-up data
def test_gradient_tiles_say_where_they_go():
    t = ImageJigsaw(level=0, source="gradient")
    for i in range(5):
        s = t.sample(i, "test"); assert t.verify(s)
        placed = [np.asarray(s["images"][j]).astype(float) for j in parse_order(s["answer"])]   # tiles at places 0..3
        red, green = [p[..., 0].mean() for p in placed], [p[..., 1].mean() for p in placed]
        assert red[1] > red[0] and red[3] > red[2] and green[2] > green[0] and green[3] > green[1]
    with pytest.raises(ValueError, match="unknown source"): ImageJigsaw(source="noise")


def test_repetition_penalty_reward():
    from mmlit.jigsaw import repetition_penalty_reward
    outs = ["1,1,2,3", "1,0,2,3", "x", "1,1,2", "<answer>3 3 3 3</answer>"]
    assert repetition_penalty_reward([""] * 5, outs, answer=["0,1,2,3"] * 5) == [-0.5, 0.0, 0.0, 0.0, -0.5]
    assert repetition_penalty_reward([""], ["1,1"], answer=["0,1"], penalty=-1.0) == [-1.0]
    with pytest.raises(ValueError, match="answer"): repetition_penalty_reward([""], ["0,1"])


def test_warmup_data_mixes_format_and_old_tasks():
    from mmlit.jigsaw import PROBE_TRAIN, uninformed, warmup_data
    d = warmup_data(n=20, seed=3)
    tasks = [d[i]["task"] for i in range(len(d))]
    assert len(d) == 120 and {t: tasks.count(t) for t in set(tasks)} == {"jigsaw_image": 60, **dict.fromkeys(PROBE_TRAIN, 20)}
    jig = [d[i] for i in range(len(d)) if d[i]["task"] == "jigsaw_image"]
    assert sorted(s["meta"]["source"] for s in jig) == ["gradient"] * 20 + ["photo"] * 20 + ["scene"] * 20
    assert all(is_permutation(parse_order(s["answer"]), 4) for s in jig)
    t = ImageJigsaw(level=0, source="gradient")
    u = uninformed(t, 100, seed=1)   # random answers: right about 1 time in 24, whatever the picture
    assert 0 < sum(t.verify(s) for s in u) < 15 and all(s["conversation"][1]["content"] == s["answer"] for s in u)


def test_cue_grpo_run_rejects_unknown_arm():
    from mmlit.jigsaw import cue_grpo_run
    with pytest.raises(ValueError, match="unknown arm"): cue_grpo_run(None, None, "both", 0, "/tmp/x")


# ---------------------------------------------------------------- the early-stopped warm-up and GRPO from it (2 x 2 and 3 x 3)
def test_gradient_3x3_tiles_say_where_they_go():
    t = ImageJigsaw(level=1, source="gradient")
    for i in range(3):
        s = t.sample(i, "test"); assert t.verify(s) and t.pieces == 9
        placed = [np.asarray(s["images"][j]).astype(float) for j in parse_order(s["answer"])]   # raster places 0..8
        red = np.array([p[..., 0].mean() for p in placed]).reshape(3, 3); green = np.array([p[..., 1].mean() for p in placed]).reshape(3, 3)
        assert (np.diff(red, axis=1) > 0).all() and (np.diff(green, axis=0) > 0).all()


def test_warm_grpo_run_bad_input():
    from mmlit.jigsaw import gradient_warmup, warm_grpo_run
    with pytest.raises(ValueError, match="grid 5"): gradient_warmup(5, "/tmp/x")
    with pytest.raises(ValueError, match="gamma"): warm_grpo_run(None, None, -0.1, 0, "/tmp/x")


def test_warm_grpo_run_scores_the_held_out_jigsaws(tmp_path):
    from mmlit.jigsaw import warm_grpo_run
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    from mmlit.processing import MMProcessor, tiny_tokenizer
    tok = tiny_tokenizer()
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1,
                      vision_model_type="siglip_vision_model")
    torch.manual_seed(0); m = MMModel(cfg); fit_to_tokenizer(m, tok)
    proc = MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    res = warm_grpo_run(m, proc, 0.0, 0, tmp_path, grid=3, steps=2, eval_every=1, prompts_per_step=2, group_size=2)
    assert [e["step"] for e in res["evals"]] == [1, 2] and len(res["reward"]) == 2
    assert set(res["evals"][0]) == {"step", "gradient 3x3/exact", "gradient 3x3/positions", "gradient 3x3/valid"}
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())   # the warm model itself is not trained


def test_video_light_cue_tells_time():
    for level in (0, 1):
        t, plain = VideoJigsaw(level=level, cue="light"), VideoJigsaw(level=level)
        for i in range(5):
            s = t.sample(i, "test"); assert t.verify(s) and s["meta"]["cue"] == "light"
            F = t.frames_per_clip
            light = [np.asarray(s["images"][F * j + f]).mean() for j in parse_order(s["answer"]) for f in range(F)]
            assert all(b > a for a, b in zip(light, light[1:]))   # every frame brighter than the one before it in time
            assert s["meta"]["keys"] == plain.sample(i, "test")["meta"]["keys"]   # the same clips and order as without the cue
    with pytest.raises(ValueError, match="unknown cue"): VideoJigsaw(cue="sound")


def test_blind_baseline_of_orders_too_many_to_list():
    "A jigsaw scene gives only the number of its answers (K!): the blind baseline is about chance, its uniform loss ln K!."
    import math
    from mmlit.data import blind_baseline
    t = ImageJigsaw(level=0, size=64)
    assert t.sample(0)["meta"]["n_options"] == math.factorial(4)
    b = blind_baseline(t.stream("train", 40), t.stream("test", 30))
    assert b.uniform_loss == pytest.approx(math.log(24)) and b.accuracy <= 0.2 and b.loss > 0
    bad = dict(t.sample(1), meta={k: v for k, v in t.sample(1)["meta"].items() if k != "n_options"})
    with pytest.raises(ValueError, match="lists no answers"):
        blind_baseline(t.stream("train", 5), [bad])
