"Tests of mmlit.evolve: Reward-Pass@k and selection, rationales and step truth, step ends, the loop's variants and exact resume."
import json
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from mmlit.data import Task, make_task, sample_meta
from mmlit.evolve import (EvolveConfig, ProcessRewardModel, RationaleData, SelfEvolver, format_response, gold_steps,
                          mc_step_labels, pass_at_k, response_steps, reward_pass_at_k, sample_groups, select_responses,
                          step_ends, step_truth, with_rationale)

torch.set_num_threads(1)


from tinymodel import tiny_pair as tiny


tables = st.integers(1, 6).flatmap(lambda k: st.tuples(
    st.lists(st.lists(st.booleans(), min_size=k, max_size=k), min_size=1, max_size=8),
    st.lists(st.lists(st.floats(-5, 5), min_size=k, max_size=k), min_size=1, max_size=8)))


# ---------------------------------------------------------------- Reward-Pass@k and selection
@settings(max_examples=60, deadline=None)
@given(tables, st.integers(1, 6))
def test_reward_pass_matches_a_loop(table, k):
    correct, scores = table
    n = min(len(correct), len(scores)); correct, scores = correct[:n], scores[:n]
    want = np.mean([any(c[j] for j in sorted(range(len(s)), key=lambda j: -s[j])[:k]) for c, s in zip(correct, scores)])
    assert reward_pass_at_k(correct, scores, k) == pytest.approx(want)
    assert reward_pass_at_k(correct, scores, k) <= pass_at_k(correct) + 1e-12   # a reward model cannot beat Pass@K
    assert reward_pass_at_k(correct, scores, len(correct[0])) == pytest.approx(pass_at_k(correct))


@settings(max_examples=60, deadline=None)
@given(tables, st.integers(1, 4))
def test_selection_keeps_only_correct_and_the_best(table, k):
    correct, scores = table
    n = min(len(correct), len(scores)); correct, scores = correct[:n], scores[:n]
    for strategy in ("top", "random", "all"):
        sel = select_responses(correct, scores, k, strategy, np.random.default_rng(1))
        for c, s, idx in zip(correct, scores, sel):
            assert all(c[j] for j in idx) and len(set(idx)) == len(idx)
            n_ok = sum(c)
            assert len(idx) == (n_ok if strategy == "all" else min(k, n_ok))
            if strategy == "top" and idx:   # nothing correct and unchosen scores higher than the worst chosen
                assert min(s[j] for j in idx) >= max([s[j] for j in range(len(c)) if c[j] and j not in idx], default=-np.inf)


def test_selection_and_pass_errors():
    with pytest.raises(ValueError, match="unknown strategy"): select_responses([[1]], [[0.]], strategy="best")
    with pytest.raises(ValueError, match="needs scores"): select_responses([[1]], None, strategy="top")
    with pytest.raises(ValueError, match=r"must be \(N, K\)"): pass_at_k([1, 0])
    with pytest.raises(ValueError, match="k must be >= 1"): reward_pass_at_k([[1]], [[0.]], k=0)


# ---------------------------------------------------------------- rationales and steps
@pytest.mark.parametrize("name", ["count", "bar_chart", "colour_position"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_gold_steps_are_true_and_lead_to_the_answer(name, level):
    task = make_task(name, seed=4, level=level)
    for s in task.stream("train", 20):
        steps = gold_steps(task, s)
        assert steps and all(step_truth(task, s, steps))
        r = format_response(steps, s["answer"])
        assert response_steps(r) == steps
        if name == "count": assert len(steps) == int(s["answer"])
        if name == "bar_chart": assert f"{sample_meta(s)['bar']} {s['answer']}" in steps


def test_step_truth_flags_false_and_repeated_steps():
    task = make_task("bar_chart", seed=0)
    s = task.sample(0)
    vals = sample_meta(s)["values"]
    wrong = f"A {(vals[0] + 1) % (task.max_value + 1)}"
    assert step_truth(task, s, [f"A {vals[0]}", f"A {vals[0]}", wrong, "not a step"]) == [True, False, False, False]


def test_rationale_data_is_indexable_and_checked():
    tasks = [make_task("count", seed=1, size=64), make_task("bar_chart", seed=1, size=64)]
    d = RationaleData(tasks, 5)
    assert len(d) == 5 and d[1]["task"] == "bar_chart" and "<think>" in d[0]["conversation"][1]["content"]
    with pytest.raises(IndexError): d[5]
    with pytest.raises(ValueError, match="need tasks"): RationaleData([], 3)
    class Bare(Task): name = "bare"   # a user's task with neither a rationale writer nor a caption
    with pytest.raises(ValueError, match="no rationale writer"): gold_steps(Bare(), {"meta": {}})


def test_step_ends_close_each_line():
    _, proc = tiny()
    text = "<think>\nstar at row 1 column 2\n\nB 7\n</think><answer>7</answer>"
    ids = proc.tokenizer(text)["input_ids"]
    ends = step_ends(proc, ids)
    assert [s for s, _ in ends] == ["star at row 1 column 2", "B 7"]
    for s, j in ends: assert proc.tokenizer.decode(ids[:j + 1]).endswith(s + "\n")
    assert step_ends(proc, proc.tokenizer("no think block")["input_ids"]) == []


# ---------------------------------------------------------------- the loop
def every_other(prompts, completions, **cols):
    "A user's checker with TRL's signature: responses of even token length are 'right' (so a random model has some)."
    return [float(len(c) % 2 == 0) for c in completions]


def _evolver(tmp_path, variant="continuous", rounds=3, **kw):
    model, proc = tiny()
    pool = list(make_task("colour_position", size=32, seed=3).stream("train", 8))
    cfg = EvolveConfig(output_dir=str(tmp_path), variant=variant, rounds=rounds, round_fraction=0.5, k=3, select="random",
                       steps_per_round=2, batch_size=2, max_new_tokens=5, lr=1e-2, progress=False, **kw)
    return SelfEvolver(model, proc, pool, cfg, reward_funcs=[every_other], heldout=pool[:2])


def test_sample_groups_with_a_user_checker():
    model, proc = tiny()
    torch.manual_seed(0)
    groups, correct = sample_groups(model, proc, list(make_task("count", size=32).stream("train", 3)), 4, 1.0, 6,
                                    reward_funcs=[every_other], batch_size=2)
    assert correct.shape == (3, 4) and len(groups) == 3
    for g, row in zip(groups, correct): assert row.tolist() == [len(t) % 2 == 0 for t in g.texts]


def test_rounds_walk_the_pool_by_fraction(tmp_path):
    ev = _evolver(tmp_path)
    assert ev.per_round == 4
    ids = [[s["id"] for s in ev.round_prompts(r)] for r in range(3)]
    assert set(ids[0]) | set(ids[1]) == {s["id"] for s in ev.pool} and ids[2] == ids[0]   # an epoch is 2 rounds


@pytest.mark.parametrize("variant", ["continuous", "iterative", "restem"])
def test_variants_start_rounds_as_defined(tmp_path, variant):
    ev = _evolver(tmp_path, variant)
    init = {k: v.clone() for k, v in ev.model.state_dict().items()}
    ev.run_round()
    trained = {k: v.clone() for k, v in ev.model.state_dict().items()}
    assert any(not torch.equal(init[k], trained[k]) for k in init)
    opt_before = ev.optimizer
    ev._start_round()
    now = ev.model.state_dict()
    same_as = lambda ref: all(torch.equal(ref[k], now[k]) for k in ref)
    assert same_as(init) == (variant == "restem") and same_as(trained) == (variant != "restem")
    assert (ev.optimizer is opt_before) == (variant == "continuous")
    if variant == "continuous": assert ev.scheduler.last_epoch == 2   # one schedule over every round's steps
    else: assert ev.scheduler.last_epoch == 0


@pytest.mark.parametrize("variant", ["continuous", "restem"])
def test_resume_is_exact(tmp_path, variant):
    straight = _evolver(tmp_path / "a", variant).train()
    cut = _evolver(tmp_path / "b", variant, rounds=3)
    cut.cfg.rounds = 1; cut.train()            # stops after round 1 (its checkpoint written)
    resumed = _evolver(tmp_path / "b", variant)
    rows = resumed.train(resume=True)
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("_s") and k != "responses_per_s"}
    assert [drop(r) for r in rows] == [drop(r) for r in straight]
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in _final(tmp_path / "a").items())


def _final(out):
    from safetensors.torch import load_file
    from mmlit.train import latest_checkpoint
    return load_file(str(latest_checkpoint(out) / "model.safetensors"))


def test_damaged_checkpoint_is_refused(tmp_path):
    ev = _evolver(tmp_path, rounds=1); ev.train()
    from mmlit.train import latest_checkpoint
    f = latest_checkpoint(tmp_path) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(ValueError, match="model.safetensors"): _evolver(tmp_path, rounds=2).train(resume=True)


def test_config_and_prm_requirements(tmp_path):
    with pytest.raises(ValueError, match="unknown select"): EvolveConfig(select="best")
    with pytest.raises(ValueError, match="steps_per_round"): EvolveConfig(steps_per_round=0)
    model, proc = tiny()
    with pytest.raises(ValueError, match="process reward model"):
        SelfEvolver(model, proc, [make_task("count", size=32).sample(0)], EvolveConfig(select="top"))
    with pytest.raises(ValueError, match="prompt pool is empty"): SelfEvolver(model, proc, [], EvolveConfig(select="all"))


def test_prm_scores_steps_and_mc_labels_are_shares(tmp_path):
    model, proc = tiny()
    task = make_task("bar_chart", size=32, seed=2, level=0)
    s = task.sample(0)
    good = proc.tokenizer(with_rationale(task, s)["conversation"][1]["content"])["input_ids"]
    prm = ProcessRewardModel(model, proc, hidden=8)
    feats = prm.step_features(s, [good, good[:3]])
    assert feats[0].shape == (len(gold_steps(task, s)), 64) and feats[1].shape[0] == 0
    assert len(prm.process_rewards(s, [good, good[:3]])) == 2 and prm.process_rewards(s, [good[:3]]) == [0.0]
    hist = prm.fit(feats[0], torch.ones(len(feats[0])), epochs=50, lr=1e-2)
    assert hist[-1] < hist[0]
    torch.manual_seed(0)
    labels = mc_step_labels(model, proc, [(s, good)], n=2, max_new_tokens=4)
    assert len(labels[0]) == len(gold_steps(task, s)) and all(v in (0.0, 0.5, 1.0) for v in labels[0])


def test_restem_samples_with_the_latest_policy_then_trains_the_initial_model(tmp_path, monkeypatch):
    import mmlit.evolve as E
    ev = _evolver(tmp_path, "restem")
    seen, real = [], E.sample_groups
    def spy(model, *a, **kw):
        seen.append(sum(float(p.detach().sum()) for p in model.parameters())); return real(model, *a, **kw)
    monkeypatch.setattr(E, "sample_groups", spy)
    total = lambda: sum(float(p.detach().sum()) for p in ev.model.parameters())
    init = total()
    ev.cfg.explore_prompts = None; ev.heldout = []   # no held-out sampling: every spy call is a round's rollout
    ev.run_round(); after1 = total()
    ev.run_round()
    assert seen[0] == pytest.approx(init) and seen[1] == pytest.approx(after1) and after1 != pytest.approx(init)


class ConstantPRM:
    "A stand-in process reward model: every response gets the same process reward."
    def __init__(self, v): self.v = v
    def process_rewards(self, sample, responses): return [self.v] * len(responses)


@pytest.mark.parametrize("v, kept_some", [(0.2, False), (0.9, True)])
def test_min_process_reward_drops_low_scored_correct_responses(tmp_path, v, kept_some):
    model, proc = tiny()
    pool = list(make_task("colour_position", size=32, seed=3).stream("train", 8))
    cfg = EvolveConfig(output_dir=str(tmp_path), rounds=1, round_fraction=0.5, k=3, select="all", min_process_reward=0.5,
                       steps_per_round=1, batch_size=2, max_new_tokens=5, progress=False)
    row = SelfEvolver(model, proc, pool, cfg, prm=ConstantPRM(v), reward_funcs=[every_other]).run_round()
    assert row["train_correct"] > 0 and (row["kept"] > 0) == kept_some
    with pytest.raises(ValueError, match="min_process_reward need a process reward model"):
        SelfEvolver(model, proc, pool, cfg, reward_funcs=[every_other])


def test_rationale_data_start_and_train_prm_without_steps(tmp_path):
    tasks = [make_task("bar_chart", seed=1, size=64)]
    assert RationaleData(tasks, 2, start=5)[0]["id"] == tasks[0].sample(5)["id"]
    from mmlit.evolve import train_prm
    model, proc = tiny()
    with pytest.raises(ValueError, match="has a reasoning step"):
        train_prm(model, proc, list(make_task("count", size=32).stream("train", 2)), {"count": make_task("count", size=32)},
                  k=2, n=1, max_new_tokens=3)
