"Integration and property tests of mmlit.grpo: advantages, loss, masks, rewards, rollouts, trainer resume."
import math
import pytest
import torch
from mmlit.data import make_task
from mmlit.grpo import (GRPOConfig, GRPOTrainer, accuracy_reward, assemble, completion_logps, completion_mask, decode_completions,
                        format_reward, group_advantages, grpo_loss, inverse_cdf_sample, prompt_batch, rollout, sample_completions,
                        score_completions, shared_prompt_logps, top_p_filter, zero_variance_groups)
from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
from mmlit.processing import MMProcessor, tiny_tokenizer
from mmlit.train import read_metrics

torch.set_num_threads(1)


def tiny(seed=0):
    tok = tiny_tokenizer()
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=64, vision_layers=1, text_hidden=64, text_layers=1,
                      vision_model_type="siglip_vision_model")
    torch.manual_seed(seed)
    m = MMModel(cfg); fit_to_tokenizer(m, tok)
    return m, MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)


# ---------------------------------------------------------------- advantages
def test_advantages_hand_computed():
    r = torch.tensor([2., 0., 1., 1., 3., 3., 3., 3.])
    a = group_advantages(r, 4)
    std = torch.tensor([2., 0., 1., 1.]).std()  # n-1
    torch.testing.assert_close(a[:4], (torch.tensor([2., 0., 1., 1.]) - 1) / (std + 1e-4))
    assert a[4:].tolist() == [0.0] * 4
    torch.testing.assert_close(group_advantages(r, 4, "none"), torch.tensor([1., -1., 0., 0., 0., 0., 0., 0.]))
    torch.testing.assert_close(group_advantages(r, 4, "batch"), torch.tensor([1., -1., 0., 0., 0., 0., 0., 0.]) / (r.std() + 1e-4))
    assert group_advantages(r, 4, eps=1.0)[0] == pytest.approx(1 / (float(std) + 1))


def test_advantages_sum_to_zero_per_group_and_zero_variance():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (64,), generator=g).float()
    a = group_advantages(r, 8).view(-1, 8)
    assert torch.allclose(a.sum(1), torch.zeros(8), atol=1e-5)
    zv = zero_variance_groups(r, 8)
    assert (a[zv] == 0).all()
    # constant groups of awkward floats are exactly zero too
    assert group_advantages(torch.full((6,), 0.1), 3).abs().max() == 0


def test_advantages_nan_rewards_excluded():
    r = torch.tensor([1., float("nan"), 0., 0., float("nan"), float("nan"), float("nan"), float("nan")])
    a = group_advantages(r, 4)
    ref = torch.tensor([1., 0., 0.]); std = ref.std()
    torch.testing.assert_close(a[[0, 2, 3]], (ref - ref.mean()) / (std + 1e-4))
    assert a[1] == 0 and (a[4:] == 0).all()


@pytest.mark.parametrize("bad, msg", [(dict(group_size=3), "does not divide"), (dict(scale="std"), "unknown scale"),
                                      (dict(group_size=0), "positive int")])
def test_advantages_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg): group_advantages(torch.zeros(8), **{"group_size": 4, **bad})


def test_advantages_2d_rejected():
    with pytest.raises(ValueError, match="flat vector"): group_advantages(torch.zeros(2, 4), 4)


# ---------------------------------------------------------------- loss
def _grad(log_ratio, adv, **kw):
    lp = torch.tensor([[float(log_ratio)]], requires_grad=True)
    loss, st = grpo_loss(lp, torch.zeros(1, 1), torch.tensor([float(adv)]), torch.ones(1, 1), **kw)
    loss.backward()
    return float(lp.grad), st


@pytest.mark.parametrize("ratio, adv, eps_high, clipped", [
    (1.1, 1, None, False), (1.3, 1, None, True), (1.25, 1, 0.28, False), (1.3, 1, 0.28, True),
    (0.9, -1, None, False), (0.7, -1, None, True), (0.7, 1, None, False), (1.5, -1, None, False)])
def test_clipping_changes_gradient(ratio, adv, eps_high, clipped):
    g, st = _grad(math.log(ratio), adv, eps_high=eps_high)
    if clipped:
        assert g == 0.0
        assert st["clip_region"] == 1.0 and st["clip_high" if adv > 0 else "clip_low"] == 1.0
    else:
        assert g == pytest.approx(-ratio * adv, rel=1e-5)
        assert st["clip_region"] == 0.0


def test_gradient_sign_raises_good_tokens():
    lp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = grpo_loss(lp, None, torch.tensor([1., -1.]), torch.ones(2, 3))
    loss.backward()
    assert (lp.grad[0] < 0).all() and (lp.grad[1] > 0).all()   # descent raises the log-prob of A>0 tokens, lowers A<0


def test_loss_normalisations_by_hand():
    torch.manual_seed(0)
    lp, old = torch.randn(3, 5) * 0.1, torch.randn(3, 5) * 0.1
    adv = torch.tensor([1.0, -0.5, 2.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    ratio = (lp - old).exp()
    tok = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * mask
    expect = {"grpo": (tok.sum(1) / mask.sum(1)).mean(), "bnpo": tok.sum() / mask.sum(),
              "dr_grpo": tok.sum() / (3 * 7), "dapo": tok.sum() / 40}
    for lt, e in expect.items():
        loss, st = grpo_loss(lp, old, adv, mask, loss_type=lt, max_completion_length=7, num_items=40)
        assert float(loss) == pytest.approx(float(e), rel=1e-5), lt
    assert float(grpo_loss(lp, old, adv, mask, loss_type="dapo")[0]) == pytest.approx(float(tok.sum() / 8), rel=1e-5)


def test_length_bias():
    "grpo weighs a short sequence's tokens more; dapo and dr_grpo weigh every token the same."
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0, 0]])
    grads = {}
    for lt in ("grpo", "dapo", "dr_grpo", "bnpo"):
        lp = torch.zeros(2, 8, requires_grad=True)
        grpo_loss(lp, None, torch.tensor([1., 1.]), mask, loss_type=lt, max_completion_length=8)[0].backward()
        grads[lt] = lp.grad
    assert grads["grpo"][1, 0] == pytest.approx(4 * grads["grpo"][0, 0])
    for lt in ("dapo", "dr_grpo", "bnpo"): assert grads[lt][1, 0] == pytest.approx(grads[lt][0, 0])


def test_kl_k3():
    lp, ref = torch.tensor([[0.0, -1.0]]), torch.tensor([[-0.5, -1.0]])
    loss, st = grpo_loss(lp, None, torch.zeros(1), torch.ones(1, 2), ref_logps=ref, beta=0.1, loss_type="bnpo")
    k3 = math.exp(-0.5) + 0.5 - 1
    assert st["kl"] == pytest.approx(k3 / 2, rel=1e-5) and float(loss) == pytest.approx(0.1 * k3 / 2, rel=1e-5)


@pytest.mark.parametrize("kw, msg", [(dict(loss_type="ppo"), "unknown loss_type"), (dict(beta=0.1), "needs ref_logps"),
                                     (dict(loss_type="dr_grpo"), "max_completion_length"),
                                     (dict(old_logps=torch.zeros(2, 4)), "old_logps has shape"),
                                     (dict(advantages=torch.zeros(4)), "advantages must be"),
                                     (dict(mask=torch.ones(3, 3)), "mask has shape")])
def test_loss_bad_input(kw, msg):
    args = dict(logps=torch.zeros(2, 3), old_logps=None, advantages=torch.zeros(2), mask=torch.ones(2, 3))
    args.update(kw)
    with pytest.raises(ValueError, match=msg): grpo_loss(**args)


# ---------------------------------------------------------------- masks
def test_eos_and_truncation_masks():
    ids = torch.tensor([[3, 9, 9], [7, 7, 3], [7, 7, 7], [7, 3, 3]])
    m, tr = completion_mask(ids, 3)
    assert m.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert tr.tolist() == [False, False, True, False]
    m2, _ = completion_mask(ids, 3, mask_truncated=True)
    assert m2[2].tolist() == [0, 0, 0] and m2[1].tolist() == [1, 1, 1]


def test_masked_tokens_get_no_gradient():
    lp = torch.zeros(2, 4, requires_grad=True)
    mask, _ = completion_mask(torch.tensor([[5, 3, 5, 5], [5, 5, 5, 5]]), 3, mask_truncated=True)
    grpo_loss(lp, None, torch.tensor([1., 1.]), mask)[0].backward()
    assert (lp.grad[0, 2:] == 0).all() and (lp.grad[1] == 0).all() and (lp.grad[0, :2] != 0).all()


# ---------------------------------------------------------------- rewards
HACKS = ["", "   ", "<answer></answer>", "<think></think><answer></answer>", "<think>it is red</think>",
         "red " * 50, "<answer>red</answer>" * 40, "<answer>red blue green</answer>", "red blue green yellow purple orange",
         "<answer>red", "answer:", "\\boxed{}"]


@pytest.mark.parametrize("text", HACKS)
def test_reward_hacks_earn_no_accuracy(text):
    assert accuracy_reward(None, [text], answer=["red"], task=["colour_position"]) == [0.0]


def test_format_reward():
    ok = ["<think>a</think><answer>red</answer>", "<think>\nlong\n</think>\n<answer>\n3\n</answer>\n"]
    bad = ["<answer>red</answer>", "<think></think><answer></answer>", "<think>a</think><answer>red</answer> extra",
           "<think>a</think><answer>red</answer><answer>b</answer>", "<think><think>a</think><answer>x</answer>"]
    assert format_reward(None, ok) == [1.0, 1.0]
    assert format_reward(None, bad) == [0.0] * len(bad)


def test_score_completions_none_and_weights():
    def f(prompts, completions, answer, **kw): return [None if a is None else 2.0 for a in answer]
    def g(prompts, completions, **kw): return [None, 1.0, None]
    per, tot = score_completions([f, g], ["q"] * 3, ["a", "b", "c"], weights=[0.5, 3.0], answer=["x", "y", None])
    assert tot[:2].tolist() == [1.0, 4.0] and math.isnan(tot[2])
    with pytest.raises(ValueError, match="2 reward functions but 1 weights"): score_completions([f, g], ["q"], ["a"], weights=[1.0], answer=["x"])


# ---------------------------------------------------------------- rollouts
def test_images_encoded_once_per_prompt():
    model, proc = tiny()
    task = make_task("colour_position", size=32)
    prompts = prompt_batch(proc, list(task.stream("train", 3)))
    seen = []
    h = model.vision_model.register_forward_hook(lambda mod, i, o: seen.append(o.last_hidden_state.shape[0]))
    calls = []
    orig = model.get_image_features
    model.get_image_features = lambda px: (calls.append(px.shape[0]), orig(px))[1]
    try:
        torch.manual_seed(0)
        comp = sample_completions(model, prompts, 5, proc.eot_token_id, proc.pad_token_id, max_new_tokens=4)
        assert comp.shape[0] == 15 and calls == [3]
        mask, _ = completion_mask(comp, proc.eot_token_id)
        completion_logps(model, prompts, comp, mask)
        assert calls == [3, 3] and seen == [3, 3]
        # transformers' own route encodes every image G times
        model.generate(**prompts, num_return_sequences=5, do_sample=True, max_new_tokens=2, pad_token_id=proc.pad_token_id)
        assert calls[-1] == 15
    finally:
        h.remove(); del model.get_image_features


def test_logps_match_plain_forward_with_padding():
    model, proc = tiny()
    samples = list(make_task("colour_position", size=32).stream("train", 2)) + list(make_task("count", size=32).stream("train", 1))
    prompts = prompt_batch(proc, samples)
    assert (prompts["attention_mask"] == 0).any()   # prompts of different lengths: left padding is exercised
    torch.manual_seed(1)
    comp = sample_completions(model, prompts, 2, proc.eot_token_id, proc.pad_token_id, max_new_tokens=5, temperature=1.3)
    mask, _ = completion_mask(comp, proc.eot_token_id)
    lp, ent = completion_logps(model, prompts, comp, mask, temperature=1.3, with_entropy=True)
    full = torch.cat([prompts["input_ids"].repeat_interleave(2, 0), comp], 1)
    am = torch.cat([prompts["attention_mask"].repeat_interleave(2, 0), mask], 1)
    px = prompts["pixel_values"].repeat_interleave(2, 0)
    with torch.no_grad(): logits = model(input_ids=full, attention_mask=am, pixel_values=px).logits
    ref = torch.log_softmax(logits[:, -comp.shape[1] - 1:-1] / 1.3, -1).gather(-1, comp[..., None]).squeeze(-1)
    torch.testing.assert_close(lp * mask, ref * mask, atol=1e-4, rtol=1e-4)
    assert (ent >= 0).all()


def test_sampling_reproducible_and_greedy_consistent():
    model, proc = tiny()
    prompts = prompt_batch(proc, list(make_task("colour_position", size=32).stream("train", 2)))
    outs = []
    for _ in range(2):
        torch.manual_seed(5); outs.append(sample_completions(model, prompts, 3, proc.eot_token_id, proc.pad_token_id, max_new_tokens=6))
    assert torch.equal(*outs)


# ---------------------------------------------------------------- prefill once, shared-prompt loss, inverse-CDF draw
def _mixed_prompts(proc):
    "Prompts of different lengths (left padding) with one image each."
    samples = list(make_task("colour_position", size=32).stream("train", 2)) + list(make_task("count", size=32).stream("train", 1))
    prompts = prompt_batch(proc, samples)
    assert (prompts["attention_mask"] == 0).any()
    return prompts


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.3, 0.8)])
def test_decode_completions_equals_generate(temperature, top_p):
    "With the multinomial draw and the same seed, prefill-once decoding gives transformers' completions token for token."
    model, proc = tiny()
    prompts = _mixed_prompts(proc)
    kw = dict(eos_token_id=proc.eot_token_id, pad_token_id=proc.pad_token_id, max_new_tokens=7, temperature=temperature, top_p=top_p)
    for seed in range(3):
        torch.manual_seed(seed); ref = sample_completions(model, prompts, 4, **kw)
        torch.manual_seed(seed); new = decode_completions(model, prompts, 4, sampler="multinomial", **kw)
        assert torch.equal(ref, new)
    torch.manual_seed(0); a = decode_completions(model, prompts, 4, **kw)
    torch.manual_seed(0); b = decode_completions(model, prompts, 4, **kw)
    assert torch.equal(a, b) and a.shape[0] == 12   # the inverse-CDF draw is reproducible from the seed too
    img = model.config.image_token_id
    assert not (a == img).any()
    mask, _ = completion_mask(a, proc.eot_token_id)
    assert (a[mask == 0] == proc.pad_token_id).all()   # after the EOS: padding, as generate writes it
    with pytest.raises(ValueError, match="sampler"): decode_completions(model, prompts, 2, sampler="gumbel", **kw)


def test_inverse_cdf_sample():
    p = torch.tensor([[0.2, 0.0, 0.5, 0.3]])
    assert inverse_cdf_sample(p.expand(5, 4), torch.tensor([0.0, 0.199, 0.2, 0.69, 0.999])).tolist() == [0, 0, 2, 2, 3]
    assert inverse_cdf_sample(2 * p, torch.tensor([0.7])).tolist() == [3]   # unnormalised rows: u scales with the total
    g = torch.Generator().manual_seed(0)
    d = inverse_cdf_sample(p.expand(100_000, 4), torch.rand(100_000, generator=g))
    torch.testing.assert_close(torch.bincount(d, minlength=4) / 1e5, p[0], atol=6e-3, rtol=0)
    assert not (d == 1).any()
    tail0 = torch.tensor([[0.5, 0.5, 0.0, 0.0]])   # u × total rounding up to the total never picks a zero-probability tail
    assert inverse_cdf_sample(tail0.expand(2, 4), torch.tensor([1.0, 1 - 1e-9])).tolist() == [1, 1]
    with pytest.raises(ValueError, match="rows, vocabulary"): inverse_cdf_sample(p[0])


def test_top_p_filter_is_transformers_rule():
    from transformers.generation.logits_process import TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    for top_p in (0.1, 0.5, 0.95):
        sc = torch.randn(6, 40, generator=g) * 3
        assert torch.equal(top_p_filter(sc, top_p), TopPLogitsWarper(top_p)(None, sc.clone()))
    assert top_p_filter(sc, 1.0) is sc


def test_shared_prompt_logps_equal_g_copies_forward():
    "Log-probs, entropies and gradients (LLM, projector and encoder) of the shared-prompt forward equal the G-copies forward."
    model, proc = tiny()
    prompts = _mixed_prompts(proc)
    torch.manual_seed(2)
    comp = sample_completions(model, prompts, 3, proc.eot_token_id, proc.pad_token_id, max_new_tokens=6, temperature=0.8)
    mask, _ = completion_mask(comp, proc.eot_token_id)
    out = []
    for fn in (completion_logps, shared_prompt_logps):
        model.zero_grad()
        lp, ent = fn(model, prompts, comp, mask, temperature=0.8, with_entropy=True)
        (lp * mask * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        out.append((lp.detach() * mask, ent.detach() * mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ea, ga), (b, eb, gb) = out
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5); torch.testing.assert_close(ea, eb, atol=1e-5, rtol=1e-5)
    assert set(ga) == set(gb) and any(n.startswith("vision_model.") for n in ga)
    top = max(float(g.abs().max()) for g in ga.values())
    assert max(float((ga[n] - gb[n]).abs().max()) for n in ga) <= 1e-5 * top
    one = comp[:, :1]   # a single completion token: only the prompt's last logits
    torch.testing.assert_close(shared_prompt_logps(model, prompts, one, mask[:, :1])[0], completion_logps(model, prompts, one, mask[:, :1])[0])
    with pytest.raises(ValueError, match="groups"): shared_prompt_logps(model, prompts, comp[:7], mask[:7])


def test_trainer_shared_prompt_resume_identical(tmp_path):
    "The shared-prompt trainer (inverse-CDF draw) trains, and a resumed run equals an uninterrupted one exactly."
    task = make_task("colour_position", size=32)
    kw = dict(shared_prompt=True, save_every=2, keep_last=3)
    straight = GRPOTrainer(tiny()[0], tiny()[1], task, _cfg(tmp_path / "a", **kw)); straight.train()
    calls = {"n": 0}
    def dies(prompts, completions, **k):   # killed during step 3, after the step-2 checkpoint
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt("killed")
        return accuracy_reward(prompts, completions, **k)
    dies.__name__ = "accuracy_reward"
    with pytest.raises(KeyboardInterrupt): GRPOTrainer(tiny()[0], tiny()[1], task, _cfg(tmp_path / "b", **kw), [dies]).train()
    resumed = GRPOTrainer(tiny()[0], tiny()[1], task, _cfg(tmp_path / "b", **kw)); resumed.train(resume=True)
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert [r["reward"] for r in read_metrics(tmp_path / "b")] == [r["reward"] for r in read_metrics(tmp_path / "a")]
    with pytest.raises(ValueError, match="settings differ"):
        GRPOTrainer(tiny()[0], tiny()[1], task, _cfg(tmp_path / "b", **{**kw, "sampler": "multinomial"})).train(resume=True)
    with pytest.raises(ValueError, match="sampler"): GRPOConfig(sampler="top_k")


def test_rollout_and_assemble():
    model, proc = tiny()
    task = make_task("colour_position", size=32)
    torch.manual_seed(0)
    groups = rollout(model, proc, list(task.stream("train", 2)), [accuracy_reward, format_reward], group_size=3, max_new_tokens=4)
    assert len(groups) == 2 and all(len(g.texts) == 3 and g.rewards.shape == (3, 2) for g in groups)
    b = assemble(groups, proc, proc.eot_token_id)
    assert b["completion_ids"].shape[0] == 6 and b["completion_mask"].sum(1).tolist() == b["lengths"].tolist()


# ---------------------------------------------------------------- trainer
def _cfg(d, **kw):
    base = dict(output_dir=str(d), steps=4, prompts_per_step=2, group_size=3, max_new_tokens=3, lr=1e-3, progress=False,
                num_iterations=2, beta=0.05)
    base.update(kw)
    return GRPOConfig(**base)


def test_trainer_resume_identical(tmp_path):
    task = make_task("colour_position", size=32)
    model, proc = tiny()
    straight = GRPOTrainer(model, proc, task, _cfg(tmp_path / "a", save_every=2, keep_last=3))
    straight.train()
    # a run killed during step 3 (after the step-2 checkpoint), then resumed by a fresh trainer from the same initial model
    calls = {"n": 0}
    def accuracy_reward_dies(prompts, completions, **kw):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt("killed")
        return accuracy_reward(prompts, completions, **kw)
    accuracy_reward_dies.__name__ = "accuracy_reward"
    m2, _ = tiny()
    with pytest.raises(KeyboardInterrupt):
        GRPOTrainer(m2, proc, task, _cfg(tmp_path / "b", save_every=2, keep_last=3), [accuracy_reward_dies]).train()
    m3, _ = tiny()
    resumed = GRPOTrainer(m3, proc, task, _cfg(tmp_path / "b", save_every=2, keep_last=3))
    resumed.train(resume=True)
    assert resumed.step == 4
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    rows = read_metrics(tmp_path / "b")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["reward"] for r in rows] == [r["reward"] for r in read_metrics(tmp_path / "a")]


def test_trainer_changes_weights_and_logs(tmp_path):
    model, proc = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    def always_varied(prompts, completions, **kw): return [float(i % 2) for i in range(len(completions))]
    tr = GRPOTrainer(model, proc, make_task("colour_position", size=32), _cfg(tmp_path, steps=2, num_iterations=1, beta=0.0),
                     reward_funcs=[always_varied])
    tr.train()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    row = read_metrics(tmp_path)[-1]
    for k in ("reward", "reward_std", "rewards/always_varied/mean", "zero_var_frac", "kl", "clip_low", "clip_high", "entropy",
              "completion_len", "truncated_frac", "loss", "lr", "step_s", "rollout_s"):
        assert k in row, k
    assert row["zero_var_frac"] == 0.0 and row["reward"] == 0.5


def test_dynamic_sampling_refills(tmp_path):
    model, proc = tiny()
    state = {"n": 0}
    def flaky(prompts, completions, **kw):   # the first call's groups are all constant, later ones varied
        state["n"] += 1
        return [0.0] * len(completions) if state["n"] == 1 else [float(i % 2) for i in range(len(completions))]
    tr = GRPOTrainer(model, proc, make_task("colour_position", size=32),
                     _cfg(tmp_path, steps=1, num_iterations=1, beta=0.0, dynamic_sampling=True), reward_funcs=[flaky])
    groups, st = tr.collect()
    assert st["refills"] == 1 and st["dropped_groups"] == 2 and st["zero_var_frac"] == 1.0
    assert len(groups) == 2 and not any(g.zero_variance for g in groups)


def test_reference_adapter_with_lora(tmp_path):
    from mmlit.model import add_lora
    model, proc = tiny()
    lora = add_lora(model, r=2)
    def varied(prompts, completions, **kw): return [float(i % 2) for i in range(len(completions))]
    tr = GRPOTrainer(lora, proc, make_task("colour_position", size=32), _cfg(tmp_path, steps=2, beta=0.1, lr=1e-2), [varied])
    assert tr.ref == "adapter"
    tr.train()
    rows = read_metrics(tmp_path)
    assert rows[-1]["kl"] > 0   # the adapters moved away from the base model the reference is


def test_config_and_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown loss_type"): GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="group_size must be >= 2"): GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="unknown scale_rewards"): GRPOConfig(scale_rewards="std")
    model, proc = tiny()
    task = make_task("colour_position", size=32)
    GRPOTrainer(model, proc, task, _cfg(tmp_path, steps=1, beta=0.0, num_iterations=1)).train()
    other = GRPOTrainer(tiny()[0], proc, task, _cfg(tmp_path, steps=1, beta=0.0, num_iterations=1, lr=5e-4))
    with pytest.raises(ValueError, match="settings differ"): other.train(resume=True)
    with pytest.raises(ValueError, match="reward_weights"):
        GRPOTrainer(tiny()[0], proc, task, _cfg(tmp_path, reward_weights=[1.0, 2.0]))


_MP_SCRIPT = r'''
import json, sys, torch
torch.set_num_threads(1)
from mmlit.core import seed_everything
from mmlit.model import MMModel, tiny_config, fit_to_tokenizer
from mmlit.processing import MMProcessor, tiny_tokenizer
from mmlit.data import make_task
from mmlit.grpo import GRPOConfig, GRPOTrainer
seed_everything(0)
cfg = tiny_config(image_size=64, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, vision_model_type="siglip_vision_model")
tok = tiny_tokenizer(); m = MMModel(cfg); fit_to_tokenizer(m, tok)
proc = MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)
seen = []
def length_reward(prompts, completions, **kw):
    return [float(len(c) % 5) for c in completions]
c = GRPOConfig(output_dir=sys.argv[1], steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, lr=1e-2, seed=0, progress=False)
tr = GRPOTrainer(m, proc, make_task("count"), c, [length_reward])
orig = tr._advantages
def spy(rewards):
    adv, st = orig(rewards); seen.append(dict(local=rewards[:, 0].tolist(), reward=st["reward"], adv=adv.tolist())); return adv, st
tr._advantages = spy
tr.train()
flat = torch.cat([p.detach().flatten() for p in m.parameters()])
# one file per rank: two processes printing long lines to one pipe can interleave them
open(f"{sys.argv[1]}.rank{tr.accelerator.process_index}.json", "w").write(json.dumps(dict(rank=tr.accelerator.process_index,
     world=tr.accelerator.num_processes, seen=seen, params=[float(flat.sum()), float(flat.abs().sum())])))
'''


def test_two_processes_gather_rewards_and_stay_in_sync(tmp_path):
    "torchrun with 2 processes: one world, rewards gathered before advantages, identical weights on both ranks after updates."
    import json, os, subprocess, sys
    script = tmp_path / "mp.py"; script.write_text(_MP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    res = sorted((json.loads(f.read_text()) for f in tmp_path.glob("run.rank*.json")), key=lambda d: d["rank"])
    assert [d["world"] for d in res] == [2, 2]
    for step in range(2):
        a, b = res[0]["seen"][step], res[1]["seen"][step]
        both = a["local"] + b["local"]
        assert math.isclose(a["reward"], sum(both) / len(both), rel_tol=1e-6)   # the logged mean covers both ranks' rewards
        assert a["reward"] == b["reward"]
    assert any(abs(x) > 0 for d in res for st in d["seen"] for x in st["adv"])   # there was something to learn
    assert res[0]["params"] == res[1]["params"]   # gradients were averaged: the ranks did not drift apart


_DDP_SCRIPT = r'''
import json, os, sys, zlib, torch
from safetensors.torch import save_file
from mmlit.core import seed_everything
from mmlit.model import MMModel, tiny_config, fit_to_tokenizer
from mmlit.processing import MMProcessor, tiny_tokenizer
from mmlit.data import make_task
from mmlit.grpo import GRPOConfig, GRPOTrainer, RolloutGroup
if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1: torch.set_num_threads(1)
a = json.loads(sys.argv[1])
mc = tiny_config(image_size=64, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, vision_model_type="siglip_vision_model")
tok = tiny_tokenizer()
proc = MMProcessor.from_vision_config(mc.vision_config, tok, max_num=1, use_thumbnail=False)
def length_reward(prompts, completions, **kw): return [float(len(c) % 5) for c in completions]

def fixed_rollout(tr):
    "Completions drawn from each prompt's own generator: the same whatever the process count (sampling is tested elsewhere)."
    def _rollout(n):
        groups = []
        for s in tr._next_samples(n):
            g = torch.Generator().manual_seed(zlib.crc32(repr((s.get("id"), s.get("answer"))).encode()))
            ids = [torch.randint(3, 60, (int(torch.randint(1, tr.cfg.max_new_tokens + 1, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(tr.cfg.group_size)]
            for j in range(0, len(ids), 2): ids[j][-1] = proc.eot_token_id
            rw = torch.tensor([[float(len(c) % 3 + c[0] % 2)] for c in ids])
            groups.append(RolloutGroup(s, ids, proc.batch_decode([torch.tensor(c) for c in ids]), rw))
        return groups
    return _rollout

class Stopped(Exception): pass
out = {}
for k, run in enumerate(a["runs"]):
    run = dict(run); stop, fixed = run.pop("stop_at", None), run.pop("fixed", False)
    grads = []
    for attempt in (0, 1) if stop else (0,):
        seed_everything(17 * attempt); m = MMModel(mc); fit_to_tokenizer(m, tok)   # another init on resume: the checkpoint decides
        tr = GRPOTrainer(m, proc, make_task("count"), GRPOConfig(output_dir=f"{a['out']}/run{k}", cpu=True, progress=False, **run), [length_reward])
        if fixed: tr._rollout = fixed_rollout(tr)
        orig = tr.optimizer.step
        def step(*x, tr=tr, orig=orig, **y):
            grads.append({n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None})
            return orig(*x, **y)
        tr.optimizer.step = step
        if stop and attempt == 0:
            def save(tr=tr, orig_save=tr.save):
                path = orig_save()
                if tr.step == stop: raise Stopped
                return path
            tr.save = save
        try: tr.train(resume=attempt == 1)
        except Stopped: continue
    for i, g in enumerate(grads):
        for n, t in g.items(): out[f"run{k}/step{i}/grad/{n}"] = t
    for n, p in tr.model.state_dict().items(): out[f"run{k}/final/{n}"] = p.detach().clone().contiguous()
rank = int(os.environ.get("RANK", "0"))
save_file(out, f"{a['out']}/result-{a['tag']}-rank{rank}.safetensors")
print("DONE", flush=True)
'''


def _launch(script, args, nproc):
    import json, os, subprocess, sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    r = subprocess.run(cmd + [str(script), json.dumps(args)], capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_two_processes_give_the_gradients_of_one_and_resume_exactly(tmp_path):
    "accelerate's DDP path: 2 processes × 2 prompts = 1 process × 4 prompts (gradients at every optimizer step, weights); a 2-process run stopped after its step-2 checkpoint and resumed (accelerate's load_state) ends exactly where the uninterrupted one does."
    from safetensors.torch import load_file
    script = tmp_path / "ddp.py"; script.write_text(_DDP_SCRIPT)
    base = dict(steps=2, group_size=4, max_new_tokens=5, lr=1e-2, seed=0, fixed=True)
    runs1 = [dict(base, prompts_per_step=4),                                                   # dapo, μ = 1
             dict(base, prompts_per_step=4, loss_type="grpo", num_iterations=2, beta=0.04, scale_rewards="batch")]
    runs2 = [dict(r, prompts_per_step=2) for r in runs1]
    real = dict(steps=3, prompts_per_step=2, group_size=4, max_new_tokens=5, lr=1e-2, seed=0, save_every=1, num_iterations=2)
    runs2 += [real, dict(real, stop_at=2)]                                                     # sampled rollouts: stop and resume
    _launch(script, dict(runs=runs1, out=str(tmp_path / "w1"), tag="w1"), 1)
    _launch(script, dict(runs=runs2, out=str(tmp_path / "w2"), tag="w2"), 2)
    a = load_file(str(tmp_path / "w1" / "result-w1-rank0.safetensors"))
    b, b1 = (load_file(str(tmp_path / "w2" / f"result-w2-rank{r}.safetensors")) for r in (0, 1))
    grads = [k for k in a if "/grad/" in k]
    assert len({k.split("/grad/")[0] for k in grads}) == 2 + 4                                 # optimizer steps compared
    for k in grads: assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    for k in a:
        if "/final/" in k: assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-4), k   # Adam (lr 1e-2) magnifies rounding on near-0 gradients
    assert all(torch.equal(b[k], b1[k]) for k in b if "/final/" in k)                          # the ranks agree
    finals = [k for k in b if k.startswith("run2/final/")]
    assert finals and all(torch.equal(b[k], b[k.replace("run2/", "run3/")]) for k in finals)   # exact resume, 2 processes
    assert any(b[k].abs().max() > 0 for k in b if k.startswith("run2/") and "/grad/" in k)     # (there was something to learn)
    ck = tmp_path / "w2" / "run3" / "checkpoints" / "step-000003"
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"} <= {p.name for p in ck.iterdir()}
