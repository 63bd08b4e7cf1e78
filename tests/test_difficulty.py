"""mmlit.difficulty: λ* and the PISM / CMAB tiers on hand-computed cases and their exact boundaries, properties of λ*,
masks, and the scoring on a real (untrained) tiny model: batched equals one at a time, attention rows, columns, tiers."""
import copy, math

import numpy as np
import pytest
from tinymodel import tiny_pair
import torch
from hypothesis import given, settings, strategies as st

from mmlit.data import make_task
from mmlit.difficulty import (PISM_RATIOS, TIERS, add_difficulty, answer_attention, box_mask, cmab_ratio, cmab_ratio_code,
                              cmab_scores, cmab_tier, code_layer, eager_attention, lambda_star, mask_image, masked_copies,
                              mask_rng, pism_scores, pism_tier, pixel_mask, select_tiers, tier_dataset)
from mmlit.grpo import GRPOConfig, GRPOTrainer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    "An untrained tiny model with a 3-layer LLM (the paper's CMAB rule needs >= 3) and its processor."
    return tiny_pair(0, text_layers=3)


# ---------------------------------------------------------------- λ* and PISM tiers
def test_lambda_star_hand_computed():
    p = [[1, 1, .6, .05, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, .9, .5, .1, .2, 0, 0], [1] * 10, [0] * 10]
    assert lambda_star(p, PISM_RATIOS).tolist() == [0.3, 0.8, math.inf, 0.0]
    assert lambda_star(torch.tensor(p), PISM_RATIOS, threshold=0.15).tolist() == [0.3, 0.6, math.inf, 0.0]


def test_never_fails_is_inf_and_easy():
    ls = lambda_star([[1.0] * 10], PISM_RATIOS)
    assert ls[0] == math.inf and pism_tier(ls, [True]) == ["easy"]


def test_wrong_at_zero_is_unsolved_whatever_lambda():
    assert pism_tier([0.0, 0.3, 0.5, 0.9, math.inf], [False] * 5) == ["unsolved"] * 5


def test_pism_boundaries_exactly():
    ls = [0.0, 0.1, 0.4, 0.1 * 4, 0.40001, 0.5, 0.69999, 0.7, 0.1 * 7, 0.9, math.inf]
    assert pism_tier(ls, [True] * len(ls)) == ["hard", "hard", "hard", "hard", "medium", "medium", "medium", "easy", "easy", "easy", "easy"]
    assert pism_tier(0.4, True) == "hard" and pism_tier(0.7, True) == "easy"


def test_cmab_boundaries_exactly():
    r = [0.0, 0.0999, 0.1, 0.3999, 0.4, 1.0, 1.6, 1.6001, 1.9, 1.9001, math.inf]
    assert cmab_tier(r, [True] * len(r)) == ["easy", "easy", "medium", "medium", "hard", "hard", "hard", "medium", "medium", "easy", "easy"]
    assert cmab_tier(1.0, False) == "unsolved" and cmab_tier(np.array([1.0]), np.array([False])) == ["unsolved"]


@pytest.mark.parametrize("call, msg", [
    (lambda: lambda_star([[1, 0]], PISM_RATIOS), r"shapes \(1, 2\) and \(10,\)"),
    (lambda: lambda_star([1, 0], [0, .1]), r"shapes \(2,\) and \(2,\)"),
    (lambda: lambda_star(np.ones((2, 0)), []), r"R >= 1"),
    (lambda: lambda_star([[1, 0]], [0.5, 0.2]), "strictly increasing"),
    (lambda: pism_tier([0.3, 0.5], [True]), r"shapes \(2,\) and \(1,\)"),
    (lambda: pism_tier([[0.3]], [[True]]), r"shapes \(1, 1\)"),
    (lambda: pism_tier(float("nan"), True), "NaN"),
    (lambda: cmab_tier([1.0, 2.0], [True]), r"shapes \(2,\) and \(1,\)"),
    (lambda: cmab_ratio(np.ones((3, 2, 4)), [1, 1, 0, 0], [0, 0, 1]), r"\(4,\).*shapes \(4,\) and \(3,\)"),
    (lambda: cmab_ratio(np.ones((2, 4)), [1, 1, 0, 0], [0, 0, 1, 1]), r"\(L, T, S\).*\(2, 4\)"),
    (lambda: cmab_ratio(np.ones((2, 1, 4)), [1, 1, 0, 0], [0, 0, 1, 1]), "L = 2"),
    (lambda: cmab_ratio(np.ones((3, 1, 4)), [1, 1, 0, 0], [0, 1, 1, 0]), "overlap"),
    (lambda: cmab_ratio(np.ones((3, 1, 4)), [0, 0, 0, 0], [0, 0, 1, 1]), "at least one"),
    (lambda: cmab_ratio(np.ones((3, 1, 4)), [1, 1, 0, 0], [0, 0, 1, 1], layers=[3]), "out of range"),
])
def test_bad_input_names_the_problem(call, msg):
    with pytest.raises(ValueError, match=msg): call()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=10, max_size=10), min_size=1, max_size=8), st.floats(0.01, 1))
def test_lambda_star_is_first_ratio_below(p, thr):
    ls = lambda_star(p, PISM_RATIOS, thr)
    for row, l in zip(p, ls):
        below = [r for r, x in zip(PISM_RATIOS, row) if x < thr]
        assert l == (below[0] if below else math.inf)


# ---------------------------------------------------------------- CMAB ratio
def test_cmab_ratio_hand_computed():
    attn = np.array([[[.8, 0, .1, .1], [.4, .4, .1, .1]], [[.4, .2, .2, .2], [.3, .3, .3, .0]], [[0, 0, .5, .5], [.1, .1, .4, .4]]])
    img, txt = [False, False, True, True], [True, True, False, False]
    assert cmab_ratio(attn, img, txt) == pytest.approx(7 / 12, abs=1e-7)          # only the middle layer when L = 3
    assert cmab_ratio(attn, img, txt, layers=[2]) == math.inf                     # token 1 gives its text nothing there
    geo = lambda a, b: math.exp((math.log(a + 1e-8) + math.log(b + 1e-8)) / 2)
    assert cmab_ratio(attn, img, txt, layers=[0, 1]) == pytest.approx((geo(.25, 2 / 3) + geo(.25, .5)) / 2, abs=1e-7)
    assert cmab_ratio_code(attn, img, txt, 1) == pytest.approx(.7 / 1.2)
    # keys in neither mask (padding, markers, generated tokens) count for neither side
    wide = np.concatenate([attn, np.full((3, 2, 2), .3)], 2)
    assert cmab_ratio(wide, img + [False, False], txt + [False, False]) == pytest.approx(7 / 12, abs=1e-7)


def test_cmab_ratio_no_text_attention_is_easy():
    attn = np.zeros((3, 1, 2)); attn[:, 0, 0] = 1
    rho = cmab_ratio(attn, [True, False], [False, True])
    assert rho > 1e7 and cmab_tier(rho, True) == "easy"


def test_code_layer():
    assert [code_layer(n) for n in (1, 2, 3, 28, 32)] == [0, 1, 2, 20, 23]


# ---------------------------------------------------------------- masks
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9])
def test_masks_hide_the_ratio(ratio):
    rng = np.random.default_rng(1)
    assert pixel_mask(50, 70, ratio, rng).sum() == round(ratio * 50 * 70)
    m = box_mask(224, 224, ratio, rng)
    assert abs(m.mean() - ratio) < 0.01
    if ratio:   # one filled rectangle
        ys, xs = np.nonzero(m)
        assert m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()


def test_masked_copies_deterministic_and_black():
    s = make_task("count", level=0, size=64).sample(0, "test")
    a = masked_copies(s, 0.5, 3, "pixels", mask_rng(s, 0))
    b = masked_copies(s, 0.5, 3, "pixels", mask_rng(s, 0))
    assert len(a) == 3 and all(np.array_equal(np.array(x["images"][0]), np.array(y["images"][0])) for x, y in zip(a, b))
    assert not np.array_equal(np.array(a[0]["images"][0]), np.array(a[1]["images"][0]))   # each copy its own mask
    assert (np.array(a[0]["images"][0]).sum(-1) == 0).mean() >= 0.5
    assert masked_copies(s, 0.0, 10, "box", mask_rng(s))[0] is s
    with pytest.raises(ValueError, match="unknown mask kind"): masked_copies(s, 0.5, 1, "blur", mask_rng(s))
    with pytest.raises(ValueError, match="does not match"): mask_image(s["images"][0], np.zeros((3, 3), bool))


# ---------------------------------------------------------------- scoring on a tiny model
def test_pism_scores_batched_equals_one_at_a_time(tiny):
    m, proc = tiny
    smp = list(make_task("count", level=0, size=64).stream("test", 3))
    ratios = (0.0, 0.3, 0.6)
    a = pism_scores(m, proc, smp, ratios, n_masks=2, kind="box", batch_size=5)
    b = pism_scores(m, proc, smp, ratios, n_masks=2, kind="box", batch_size=1)
    assert a["p"].shape == (3, 3) and np.array_equal(a["p"], b["p"]) and a["tier"] == b["tier"]
    assert set(a["tier"]) <= set(TIERS) and ((a["p"] == 0) | (a["p"] == 0.5) | (a["p"] == 1)).all()
    g = pism_scores(m, proc, smp, ratios, n_masks=2, score="gold_prob")
    assert ((g["p"] > 0) & (g["p"] < 1)).all()
    with pytest.raises(ValueError, match="start at 0"): pism_scores(m, proc, smp, (0.1, 0.2))
    with pytest.raises(ValueError, match="unknown score"): pism_scores(m, proc, smp, score="entropy")


def test_answer_attention_rows(tiny):
    m, proc = tiny
    smp = list(make_task("count", level=0, size=64).stream("test", 3))
    with eager_attention(m): assert m.language_model.config._attn_implementation == "eager"
    assert m.language_model.config._attn_implementation != "eager"     # restored
    rows = answer_attention(m, proc, smp, max_new_tokens=4)
    for r in rows:
        L, T, S = r["attn"].shape
        assert L == 3 and 1 <= T <= 4
        torch.testing.assert_close(r["attn"].sum(-1), torch.ones(L, T))   # each row a distribution over keys
        assert int(r["image_mask"].sum()) == proc.tokens_per_tile
        assert not (r["image_mask"] & r["text_mask"]).any() and (r["before_mask"] <= r["text_mask"]).all()
    c = cmab_scores(m, proc, smp, max_new_tokens=4, batch_size=2)
    assert c["rho"].shape == (3,) and c["rho_layers"].shape == (3, 3)
    np.testing.assert_allclose(c["rho"], c["rho_layers"][:, 1], rtol=1e-6)   # paper's rule with L = 3: the middle layer


def test_columns_dataset_and_selection(tiny, tmp_path):
    m, proc = tiny
    smp = list(make_task("count", level=0, size=64).stream("test", 4))
    pism = dict(p=np.ones((4, 10)), lambda_star=np.array([0.3, 0.5, math.inf, 0.0]),
                tier=["hard", "medium", "easy", "unsolved"])
    cmab = dict(rho=np.array([1.0, 0.2, 3.0, 1.0]), tier=["hard", "medium", "easy", "unsolved"], correct=np.array([1, 1, 1, 0], bool))
    scored = add_difficulty(smp, pism, cmab)
    ds = tier_dataset(scored)
    assert ds["pism_tier"] == pism["tier"] and ds["lambda_star"][2] == math.inf
    chosen = select_tiers(ds, ("medium", "hard"))
    assert [s["id"] for s in chosen] == [smp[0]["id"], smp[1]["id"]]
    assert [s["id"] for s in select_tiers(scored, "easy", by="cmab_tier")] == [smp[2]["id"]]
    with pytest.raises(ValueError, match="unknown tiers"): select_tiers(scored, ["tricky"])
    with pytest.raises(ValueError, match="no 'pism_tier' column"): select_tiers(smp)
    with pytest.raises(ValueError, match="4 samples but 3"): add_difficulty(smp[:3] + [smp[0]], {**pism, "tier": pism["tier"][:3]})
    # a GRPO stage takes the selected rows (read back from the dataset) as its prompts
    cfg = GRPOConfig(output_dir=str(tmp_path), steps=1, prompts_per_step=2, group_size=2, max_new_tokens=2, progress=False)
    out = GRPOTrainer(copy.deepcopy(m), proc, chosen, cfg).train()
    assert out["step"] == 1
