"""mmlit.grpo against TRL's GRPOTrainer (TRL >= 1.0; written against 1.16), number for number.

a. TRL's numbers come from TRL's own code, never from a transcription of it:
   - losses: `GRPOTrainer._compute_loss` on an instance made with `object.__new__(GRPOTrainer)`, with only the
     attributes that method reads, and `_get_per_token_logps_and_entropies` replaced by a function returning our tensors;
   - advantages: a real `GRPOTrainer` on a tiny llama, whose `_generate_and_score_completions` is driven through TRL's
     `rollout_func` hook (fixed completions) and a reward function that returns the rewards we choose.
   Known difference: TRL 1.16 multiplies the k3 KL by the importance ratio by default (`use_bias_correction_kl=True`);
   mmlit does not, so β > 0 comparisons use TRL with that option off (an xfail(strict) test documents the difference).
b. Both trainers end to end on the same initial weights, prompts (text, and images through transformers' InternVL),
   reward and per-rollout seed: identical completions, rewards, losses, pre-step gradients, nearly identical weights.
"""
import os, types, warnings
from collections import defaultdict

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import pytest
import torch

trl = pytest.importorskip("trl")
from trl import GRPOConfig, GRPOTrainer

from mmlit.grpo import LOSS_TYPES, group_advantages, grpo_loss
from mmlit.processing import tiny_tokenizer

torch.set_num_threads(1)
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)


# ---------------------------------------------------------------------------------------------------------------------
# TRL-side harnesses
# ---------------------------------------------------------------------------------------------------------------------
def trl_loss(logps, old_logps, advantages, mask, ref_logps=None, beta=0.0, eps_low=0.2, eps_high=None,
             loss_type="dapo", max_completion_length=None, num_items=None, bias_correction_kl=False):
    "TRL's `_compute_loss` on our tensors: (loss, TRL's logged metrics)."
    t = object.__new__(GRPOTrainer)
    B, T = logps.shape
    t.args = types.SimpleNamespace(use_bias_correction_kl=bias_correction_kl, delta=None, steps_per_generation=1)
    t.aux_loss_enabled, t.top_entropy_quantile, t.off_policy_mask_threshold = False, 1.0, None
    t.importance_sampling_level, t.use_vllm, t.vllm_importance_sampling_correction = "token", False, False
    t.beta, t.loss_type, t.epsilon_low = beta, loss_type, eps_low
    t.epsilon_high = eps_high if eps_high is not None else eps_low  # as GRPOTrainer.__init__ sets it
    t.max_completion_length, t.current_gradient_accumulation_steps = max_completion_length, 1
    t._entropy_bonus_enabled, t._metrics = False, {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = types.SimpleNamespace(training=True)
    t.accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x)
    t._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    inputs = dict(prompt_ids=torch.zeros(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                  completion_ids=torch.zeros(B, T, dtype=torch.long), completion_mask=mask.long(),
                  advantages=advantages, num_items_in_batch=torch.tensor(float(mask.sum() if num_items is None else num_items)))
    if old_logps is not None: inputs["old_per_token_logps"] = old_logps
    if ref_logps is not None: inputs["ref_per_token_logps"] = ref_logps
    return t._compute_loss(None, inputs), t._metrics["train"]


def tiny_llama(tok, seed=0, hidden=32, layers=2):
    "A llama from config over the tiny tokenizer's vocabulary."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg)


def trl_trainer(model, tok, reward_funcs, prompts, rollout_func=None, out="/tmp/mmlit_trl_grpo", **kw):
    "A real TRL GRPOTrainer on CPU, fp32, no vLLM, no gradient checkpointing."
    from datasets import Dataset
    cfg = dict(output_dir=out, bf16=False, use_cpu=True, report_to=[], save_strategy="no", seed=0,
               max_completion_length=8, num_generations=4, per_device_train_batch_size=8, max_steps=1,
               gradient_checkpointing=False, logging_steps=1, disable_tqdm=True)
    cfg.update(kw)
    ds = Dataset.from_list([p if isinstance(p, dict) else {"prompt": p} for p in prompts])
    return GRPOTrainer(model=model, reward_funcs=reward_funcs, args=GRPOConfig(**cfg), train_dataset=ds,
                       processing_class=tok, rollout_func=rollout_func)


@pytest.fixture(scope="module")
def tok(): return tiny_tokenizer()


@pytest.fixture(scope="module")
def adv_trainer(tok):
    def reward(completions, r, **kw): return [None if x != x else x for x in r]  # NaN → None: TRL's "not scored"
    return trl_trainer(tiny_llama(tok), tok, reward, ["a"] * 4)


def trl_advantages(tr, rewards, group_size, scale):
    "Advantages from TRL's own `_generate_and_score_completions`, fixed completions, rewards as given."
    tok = tr.processing_class
    def rollout(prompts, trainer):
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        return {"prompt_ids": ids, "completion_ids": [[5, tok.eos_token_id]] * len(prompts), "logprobs": None}
    tr.rollout_func, tr.scale_rewards, tr.num_generations = rollout, scale, group_size
    inputs = [{"prompt": f"p{i // group_size}", "r": float(r)} for i, r in enumerate(rewards)]
    return tr._generate_and_score_completions(inputs)["advantages"]


def loss_case(seed=0, B=8, T=7, spread=0.6, zero_row=False):
    "Random log-probs, old log-probs far enough off that many ratios leave the clip range, both signs of advantage."
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 4 - 0.05).requires_grad_()
    old = logps.detach() + torch.randn(B, T, generator=g) * spread
    ref = logps.detach() + torch.randn(B, T, generator=g) * 0.5
    adv = torch.randn(B, generator=g)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    if zero_row: lens[1] = 0  # a masked-out completion (e.g. TRL's mask_truncated_completions)
    mask = (torch.arange(T)[None] < lens[:, None]).float()
    return logps, old, adv, mask, ref


# ---------------------------------------------------------------------------------------------------------------------
# a. Losses
# ---------------------------------------------------------------------------------------------------------------------
def test_cases_exercise_clipping():
    "The random cases really put ratios outside [1-ε_low, 1+ε_high] on both sides, with either sign of advantage."
    logps, old, adv, mask, _ = loss_case()
    r = torch.exp(logps.detach() - old)[mask.bool()]
    assert (r < 0.8).float().mean() > 0.15 and (r > 1.28).float().mean() > 0.15
    assert (adv > 0).any() and (adv < 0).any()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_trl(loss_type, beta, eps_high, seed):
    "Loss, its gradient w.r.t. the log-probs, and the clip statistics equal TRL's, off-policy (ρ ≠ 1)."
    logps, old, adv, mask, ref = loss_case(seed, zero_row=seed == 1)
    kw = dict(ref_logps=ref if beta else None, beta=beta, eps_low=0.2, eps_high=eps_high, loss_type=loss_type,
              max_completion_length=10)
    ours, stats = grpo_loss(logps, old, adv, mask, **kw)
    theirs, metrics = trl_loss(logps, old, adv, mask, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    g1, = torch.autograd.grad(ours, logps); g2, = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)
    assert g1.abs().sum() > 0
    for k in ("low", "high", "region"):
        assert stats[f"clip_{k}"] == pytest.approx(metrics[f"clip_ratio/{k}_mean"][0], abs=1e-6)
    if beta: assert stats["kl"] == pytest.approx(metrics["kl"][0], rel=1e-5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_on_policy_value_matches_trl_default_kl(loss_type):
    "On-policy (old_logps=None, μ = 1) with β > 0, against TRL's default use_bias_correction_kl=True: same value."
    logps, _, adv, mask, ref = loss_case(3)
    kw = dict(ref_logps=ref, beta=0.1, loss_type=loss_type, max_completion_length=9)
    ours, _ = grpo_loss(logps, None, adv, mask, **kw)
    theirs, _ = trl_loss(logps, None, adv, mask, bias_correction_kl=True, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


KL_CORRECTION = ("mmlit's k3 KL term has no importance-sampling correction. TRL 1.16 multiplies the per-token KL by "
                 "ρ = exp(logπ − logπ_old) by default (GRPOConfig.use_bias_correction_kl=True): off-policy the value differs, "
                 "and even on-policy (ρ ≡ 1 in value) the gradient gains β·KL·∇logπ. mmlit equals TRL with that option off.")


@pytest.mark.xfail(strict=True, reason=KL_CORRECTION)
@pytest.mark.parametrize("on_policy", [True, False])
def test_loss_matches_trl_default_kl(on_policy):
    logps, old, adv, mask, ref = loss_case(4)
    old = None if on_policy else old
    kw = dict(ref_logps=ref, beta=0.1, loss_type="dapo")
    ours, _ = grpo_loss(logps, old, adv, mask, **kw)
    theirs, _ = trl_loss(logps, old, adv, mask, bias_correction_kl=True, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    g1, = torch.autograd.grad(ours, logps); g2, = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("num_items", [None, 23.0, 200.0])
def test_dapo_normaliser_is_generation_batch_tokens(num_items):
    "dapo divides by `num_items` (active tokens of the whole generation batch) exactly as TRL's `num_items_in_batch`."
    logps, old, adv, mask, _ = loss_case(5)
    ours, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo", num_items=num_items)
    theirs, _ = trl_loss(logps, old, adv, mask, loss_type="dapo", num_items=num_items)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    if num_items is not None:  # a larger generation batch really changes the scale: the test can fail
        base, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo")
        torch.testing.assert_close(ours, base * mask.sum() / num_items, rtol=1e-5, atol=1e-7)


def test_per_token_advantages_match_trl():
    "(B, T) advantages (TRL keeps them as given when they are 2-D)."
    logps, old, _, mask, _ = loss_case(6)
    adv = torch.randn(mask.shape, generator=torch.Generator().manual_seed(6))
    for lt in LOSS_TYPES:
        ours, _ = grpo_loss(logps, old, adv, mask, loss_type=lt, max_completion_length=7, eps_high=0.28)
        theirs, _ = trl_loss(logps, old, adv, mask, loss_type=lt, max_completion_length=7, eps_high=0.28)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------------
# a. Advantages
# ---------------------------------------------------------------------------------------------------------------------
nan = float("nan")
REWARDS = {
    "mixed, a zero-variance group": ([1, 0, 0, 1, 2, 2, 2, 2, .5, -1, 3, .2], 4),
    "all groups constant": ([1, 1, 1, 0, 0, 0], 3),
    "pairs": ([0, 1, 1, 1, -2, 5, 0.1, 0.1000001], 2),
    "unscored completions (NaN)": ([1, nan, 0, 2, nan, nan, nan, 3, 1, 1, nan, 4], 4),
    "one completion per prompt": ([0.3, 1.0, -2.0], 1),
}


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("case", list(REWARDS))
def test_advantages_match_trl(adv_trainer, case, scale):
    rewards, G = REWARDS[case]
    ours = group_advantages(torch.tensor(rewards, dtype=torch.float32), G, scale=scale)
    theirs = trl_advantages(adv_trainer, rewards, G, scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_random_match_trl(adv_trainer, scale):
    "A larger random batch: 6 prompts × 8 completions, integer-valued rewards so some groups tie."
    r = torch.randint(0, 3, (48,), generator=torch.Generator().manual_seed(0)).float() * 0.5
    r[:8] = 1.0  # one group all equal
    torch.testing.assert_close(group_advantages(r, 8, scale=scale), trl_advantages(adv_trainer, r.tolist(), 8, scale),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# b. The two trainers on the same model, prompts, reward and sampling seed
# ---------------------------------------------------------------------------------------------------------------------
def id_reward(prompts, completions, completion_ids, **kw):
    "Deterministic, depends on the sampled ids and the length (so EOS placement matters): same signature for both."
    return [sum(t % 3 == 0 for t in ids) / max(1, len(ids)) + 0.1 * len(ids) for ids in completion_ids]


def tiny_mm(tok, tiles=1):
    "A tiny MMModel (InternVL vision encoder); the EOS row of the (tied) embeddings scaled up so that sampled completions end at varied lengths."
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    from mmlit.processing import MMProcessor
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=32, vision_layers=1, text_hidden=64, text_layers=2)
    torch.manual_seed(0); model = MMModel(cfg); fit_to_tokenizer(model, tok)
    with torch.no_grad(): model.get_input_embeddings().weight[tok.eos_token_id] *= 25
    return model, MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=tiles, use_thumbnail=True)


def run_both(tmp_path, steps=2, P=2, G=4, T=8, lr=3e-2, mu=1, loss_type="dapo", beta=0.0, eps_high=None, scale="group",
             temperature=1.0, tiles=0, shared_prompt=False):
    """Train mmlit's GRPOTrainer and TRL's GRPOTrainer from the same initial weights on the same prompts: text
    (TRL trains the language model) or, with `tiles` > 0, one image of that many tiles per prompt (TRL trains
    `to_internvl(model)` through transformers' InternVL processor, which gives the same prompt ids and pixels).
    The only thing aligned by hand is the torch seed right before each generation call (both sample with
    transformers' `generate`, TRL from input ids + pixels for every row, mmlit from input embeddings built with each
    image encoded once). Records the sampled completions and the gradients each optimizer is about to apply (after
    clipping), under TRL's parameter names."""
    import copy, json
    import mmlit.grpo as mg
    from datasets import Dataset
    from transformers import TrainerCallback
    from mmlit.bench import _grpo_samples, hf_internvl_grpo_processor
    from mmlit.model import _rename, to_internvl
    tok = tiny_tokenizer()
    model, proc = tiny_mm(tok, max(1, tiles))
    qs = ["blue", "red", "cat", "sun", "tree", "two", "dog", "one"][:steps * P]   # chat prompts of 9–11 tokens: left padding
    samples = _grpo_samples(steps * P, tiles, proc.image_size)
    for s, q in zip(samples, qs): s["conversation"][0]["content"] = [{"type": "image"}, {"type": "text", "text": q}] if tiles else q
    if tiles:
        trl_model, processing, gen_kw = to_internvl(copy.deepcopy(model)), hf_internvl_grpo_processor(proc, tiles), None
        to_trl = lambda n: _rename(n, True)
        rows = [{"prompt": [{"role": "user", "content": q}], "image": s["images"][0]} for q, s in zip(qs, samples)]
        mm_params = model
    else:
        trl_model, processing, to_trl = copy.deepcopy(model.language_model), tok, lambda n: n
        gen_kw = {"suppress_tokens": [model.config.image_token_id]}  # mmlit never samples <IMG_CONTEXT>; TRL does that only for VLMs
        rows, mm_params = [{"prompt": [{"role": "user", "content": q}]} for q in qs], model.language_model
    if beta:  # TRL builds its reference model from the policy's config path
        trl_model.save_pretrained(tmp_path / "init"); trl_model.config._name_or_path = str(tmp_path / "init")
    rec = dict(mm_ids=[], trl_ids=[], mm_grads=[], trl_grads=[])
    grads = lambda m, rn=lambda n: n: {rn(n): p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    name = "decode_completions" if shared_prompt else "sample_completions"   # the shared-prompt path draws like transformers
    orig = getattr(mg, name)
    def seeded(*a, **k):
        torch.manual_seed(100 + len(rec["mm_ids"])); out = orig(*a, **k)
        mask, _ = mg.completion_mask(out, tok.eos_token_id)
        rec["mm_ids"].append([r[m.bool()].tolist() for r, m in zip(out, mask)]); return out
    mcfg = mg.GRPOConfig(output_dir=str(tmp_path / "mmlit"), steps=steps, prompts_per_step=P, group_size=G, max_new_tokens=T,
                         lr=lr, betas=(0.9, 0.999), cpu=True, progress=False, num_iterations=mu, loss_type=loss_type, beta=beta,
                         eps_high=eps_high, scale_rewards=scale, temperature=temperature, shared_prompt=shared_prompt,
                         sampler="multinomial")
    mt = mg.GRPOTrainer(model, proc, samples, mcfg, [id_reward])
    step = mt.optimizer.step
    def record_step(*a, **k): rec["mm_grads"].append(grads(mm_params, to_trl)); return step(*a, **k)
    mt.optimizer.step = record_step
    setattr(mg, name, seeded)
    try: mt.train()
    finally: setattr(mg, name, orig)
    mm_rows = [json.loads(l) for l in open(tmp_path / "mmlit" / "metrics.jsonl")]

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw): rec["trl_grads"].append(grads(trl_model))
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to=[], save_strategy="no", seed=0,
                      max_completion_length=T, num_generations=G, per_device_train_batch_size=P * G, max_steps=steps * mu,
                      num_iterations=mu, gradient_checkpointing=False, logging_steps=1, disable_tqdm=True, learning_rate=lr,
                      lr_scheduler_type="cosine", shuffle_dataset=False, optim="adamw_torch", loss_type=loss_type, beta=beta,
                      epsilon_high=eps_high, scale_rewards=scale, temperature=temperature, use_bias_correction_kl=False,
                      generation_kwargs=gen_kw)
    tt = GRPOTrainer(model=trl_model, reward_funcs=id_reward, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=processing, callbacks=[Grads()])
    gen = tt._generate_single_turn
    def tseeded(*a, **k):
        torch.manual_seed(100 + len(rec["trl_ids"])); ids, lp = gen(*a, **k); rec["trl_ids"].append(ids); return ids, lp
    tt._generate_single_turn = tseeded
    tt.train()
    trl_rows = [h for h in tt.state.log_history if "loss" in h]
    ours = {to_trl(n): p.detach() for n, p in mm_params.named_parameters()}
    return ours, dict(trl_model.named_parameters()), mm_rows, trl_rows, rec


CONFIGS = {
    "dapo": dict(),
    "grpo, mu=2, beta, eps_high, batch scale, T=0.7": dict(mu=2, lr=3e-3, loss_type="grpo", beta=0.04, eps_high=0.28,
                                                            scale="batch", temperature=0.7),
    "dr_grpo, no scaling": dict(loss_type="dr_grpo", scale="none"),
    "bnpo, mu=2": dict(loss_type="bnpo", mu=2, lr=3e-3),
    "images: 1 tile, dapo, mu=2": dict(tiles=1, mu=2, lr=3e-3, eps_high=0.28),
    "images: 3 tiles + thumbnail, grpo": dict(tiles=3, loss_type="grpo"),
    "shared prompt (prefill once, shared-prompt loss), dapo": dict(shared_prompt=True),
    "shared prompt, grpo, mu=2, beta, eps_high, batch scale, T=0.7": dict(shared_prompt=True, mu=2, lr=3e-3, loss_type="grpo", beta=0.04,
                                                                          eps_high=0.28, scale="batch", temperature=0.7),
    "shared prompt, images: 3 tiles + thumbnail, grpo": dict(shared_prompt=True, tiles=3, loss_type="grpo"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_trainers_agree(tmp_path, name):
    """Same weights, prompts, reward and seed: the same completions at every step (so sampling and the updated weights
    agree), the same rewards, losses and pre-step gradients, and nearly the same final weights (Adam divides by |g|, so
    entries whose gradient is ~0 magnify float noise: bounded by a small fraction of one step's size, lr)."""
    kw = CONFIGS[name]
    lr, mu = kw.get("lr", 3e-2), kw.get("mu", 1)
    ours, theirs, mm_rows, trl_rows, rec = run_both(tmp_path, **kw)
    assert len(rec["mm_ids"]) == len(rec["trl_ids"]) == 2
    assert rec["mm_ids"] == rec["trl_ids"]
    lengths = [len(c) for c in rec["mm_ids"][0]]
    assert min(lengths) < max(lengths) == 8  # some completions stop at EOS, some run to the budget
    assert len(rec["mm_grads"]) == len(rec["trl_grads"]) == 2 * mu
    if kw.get("tiles"):  # the vision encoder and projector are trained too, and their gradients compared
        g = rec["mm_grads"][0]
        assert any(n.startswith("model.vision_tower.") and g[n].abs().sum() > 0 for n in g)
        assert any(n.startswith("model.multi_modal_projector.") and g[n].abs().sum() > 0 for n in g)
    for a, b in zip(rec["mm_grads"], rec["trl_grads"]):
        assert set(a) == set(b)
        top = max(v.abs().max() for v in b.values())
        # fp32 noise: the two forwards sum in different orders; with 4 image tiles it reached 1.2e-4 of the largest entry
        assert max((a[n] - b[n]).abs().max() for n in a) <= 3e-4 * top
    for k, row in enumerate(mm_rows):
        trl_step = trl_rows[k * mu:(k + 1) * mu]
        assert row["reward"] == pytest.approx(trl_step[0]["reward"], rel=1e-6)
        assert row["loss"] == pytest.approx(sum(h["loss"] for h in trl_step) / mu, rel=1e-4, abs=1e-6)
        assert row["grad_norm"] == pytest.approx(trl_step[-1]["grad_norm"], rel=1e-4)
    init = tiny_mm(tiny_tokenizer())[0]
    init = init if kw.get("tiles") else init.language_model
    from mmlit.model import _rename
    sd0 = {(_rename(n, True) if kw.get("tiles") else n): p for n, p in init.named_parameters()}
    assert set(ours) == set(theirs) == set(sd0)
    diff = torch.cat([(ours[k] - theirs[k]).abs().flatten() for k in ours]) / lr
    moved = max((ours[k] - sd0[k]).abs().max() for k in ours) / lr
    assert moved > 0.5  # training really changed the weights
    assert diff.max() < 0.05 and diff.quantile(0.999) < 1e-3


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark's two sides (mmlit.bench) run and do the same amount of work
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tiles", [1, 4])
def test_bench_hf_processor_matches_mmlit(tiles):
    "The InternVL processor TRL gets in the image benchmark gives mmlit's prompt ids (left-padded batch) and pixels."
    import mmlit.bench as mb
    from mmlit.grpo import prompt_batch
    _, proc = mb.grpo_bench_model(tiles=tiles)
    hp, samples = mb.hf_internvl_grpo_processor(proc, tiles), mb._grpo_samples(3, tiles, proc.image_size)
    ours = prompt_batch(proc, samples)
    texts = [hp.apply_chat_template(s["conversation"], add_generation_prompt=True, tokenize=False) for s in samples]
    theirs = hp(images=[s["images"] for s in samples], text=texts, return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["pixel_values"].shape[0] == 3 * (tiles + (tiles > 1))
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("tiles", [0, 1])
def test_bench_grpo_sides(tiles):
    from mmlit.bench import bench_grpo_mmlit, bench_grpo_trl, grpo_bench_model
    kw = dict(prompts_per_step=2, group_size=2, max_new_tokens=4, steps=2, warmup=1, tiles=tiles)
    ours, theirs = bench_grpo_mmlit(grpo_bench_model(tiles=tiles), **kw), bench_grpo_trl(grpo_bench_model(tiles=tiles), **kw)
    for r in (ours, theirs):
        assert r["completions"] == 4 and len(r["step_s"]) == len(r["cpu_s"]) == 1 and r["step_s"][0] > 0 < r["cpu_s"][0]
        assert 1 <= r["completion_len"] <= 4
    with pytest.raises(ValueError, match="warmup"): bench_grpo_mmlit(grpo_bench_model(), **{**kw, "steps": 1})
