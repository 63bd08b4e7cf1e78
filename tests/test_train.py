"""mmlit.train: exact resume after a real SIGKILL, 2 processes = 1 process with the same global batch, checkpoint
corruption, skipped samples, LoRA checkpoints, trackers, progressive scaling."""
import json, os, signal, subprocess, sys, textwrap, time, warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmlit.core import seed_everything
from mmlit.data import make_task
from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
from mmlit.processing import MMProcessor
from mmlit.train import (MANIFEST, Trainer, TrainConfig, TrainStream, latest_checkpoint, list_checkpoints, read_metrics,
                         scale_up, stage_model, verify_checkpoint, write_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
MODEL_KW = dict(vision_hidden=32, text_hidden=64, vision_layers=1, text_layers=2, image_size=32, patch_size=8)

# The training script the subprocess tests run: a very small model (32 px tiles, 4 visual tokens each) on two tasks.
SCRIPT = '''
import json, os, sys, time, warnings, torch
from safetensors.torch import save_file
from mmlit.core import seed_everything
from mmlit.model import MMModel, tiny_config, fit_to_tokenizer
from mmlit.processing import MMProcessor
from mmlit.data import make_task
from mmlit.train import Trainer, TrainConfig
warnings.filterwarnings("ignore")
a = json.loads(sys.argv[1])
if int(os.environ.get("LOCAL_WORLD_SIZE", "1")) == 1: torch.set_num_threads(1)
mc = tiny_config(**a["model"])
proc = MMProcessor.from_vision_config(mc.vision_config, max_num=1)
tasks = [make_task("count", size=64), make_task("compare_count", size=64)]
class Stopped(Exception): pass
out = {}
for k, run in enumerate(a["runs"]):
    run = dict(run); stop = run.pop("stop_at", None)   # stop_at: leave after that step's checkpoint, then resume in a new Trainer
    grads = []
    for attempt in (0, 1) if stop else (0,):
        seed_everything(a.get("init_seed", 0) + 17 * attempt); model = MMModel(mc); fit_to_tokenizer(model, proc.tokenizer)
        calls = []
        def eval_fn(m):
            calls.append(1)
            if len(calls) == a.get("hang_at"):
                print("HANGING", flush=True); time.sleep(120)
            return {}
        tr = Trainer(model, proc, tasks, TrainConfig(output_dir=f"{a['out']}/run{k}", cpu=True, progress=False, **run), eval_fn)
        orig = tr.optimizer.step
        def step(*x, tr=tr, orig=orig, **y):
            if tr.accelerator.sync_gradients:
                grads.append({n: p.grad.detach().clone() for n, p in tr.unwrapped.named_parameters() if p.grad is not None})
            return orig(*x, **y)
        tr.optimizer.step = step
        if stop and attempt == 0:
            def save(tr=tr, orig_save=tr.save):
                path = orig_save()
                if tr.step == stop: raise Stopped
                return path
            tr.save = save
        try: tr.train(resume=a.get("resume") or attempt == 1)
        except Stopped: continue
    for i, g in enumerate(grads):
        for n, t in g.items(): out[f"run{k}/step{i}/grad/{n}"] = t
    for n, p in tr.unwrapped.state_dict().items(): out[f"run{k}/final/{n}"] = p.detach().clone().contiguous()
if int(os.environ.get("RANK", "0")) == 0: save_file(out, f"{a['out']}/result-{a['tag']}.safetensors")
print("DONE", flush=True)
'''


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"): env.pop(k, None)
    return env


def _run(script, args, nproc=1, timeout=240):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable])
    r = subprocess.run(cmd + [str(script), json.dumps(args)], capture_output=True, text=True, timeout=timeout, env=_env())
    assert r.returncode == 0 and "DONE" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    p = tmp_path_factory.mktemp("scripts") / "train_run.py"
    p.write_text(SCRIPT)
    return p


def test_resume_after_sigkill_is_exact(script, tmp_path):
    "A run killed with SIGKILL after step 5 (checkpoints every 2 steps) and resumed ends with the uninterrupted run's weights."
    run = dict(stage="2", steps=8, batch_size=2, save_every=2, eval_every=1, keep_last=2)
    base = dict(model=MODEL_KW, runs=[run])
    _run(script, dict(base, out=str(tmp_path / "straight"), tag="straight"))
    killed_out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, str(script), json.dumps(dict(base, out=str(killed_out), tag="killed", hang_at=5))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = p.stdout.readline()
            if "HANGING" in line or (not line and p.poll() is not None): break
        assert p.poll() is None, "the run ended before it could be killed: " + p.stderr.read()[-2000:]
        os.kill(p.pid, signal.SIGKILL); p.wait(30)
    finally:
        if p.poll() is None: p.kill()
    assert p.returncode == -signal.SIGKILL
    assert [c.name for c in list_checkpoints(killed_out / "run0")] == ["step-000002", "step-000004"]
    assert [r["step"] for r in read_metrics(killed_out / "run0")] == [1, 2, 3, 4, 5]
    _run(script, dict(base, out=str(killed_out), tag="resumed", resume=True, init_seed=99))   # another init: the checkpoint decides
    a, b = load_file(str(tmp_path / "straight" / "result-straight.safetensors")), load_file(str(killed_out / "result-resumed.safetensors"))
    finals = [k for k in a if "/final/" in k]
    assert finals and all(torch.equal(a[k], b[k]) for k in finals)
    assert [r["step"] for r in read_metrics(killed_out / "run0")] == list(range(1, 9))   # no step logged twice
    assert [c.name for c in list_checkpoints(killed_out / "run0")] == ["step-000006", "step-000008"]   # keep_last=2
    verify_checkpoint(latest_checkpoint(killed_out / "run0"))


def test_two_processes_give_the_gradients_of_one(script, tmp_path):
    "2 processes × batch 2 = 1 process × batch 4 (and with accumulation): the same gradients at every step, the same weights; a 2-process run stopped after its step-2 checkpoint and resumed ends exactly where the uninterrupted one does."
    runs1 = [dict(stage="2", steps=3, batch_size=4, loss_mode="square"),
             dict(stage="1.5", steps=3, batch_size=2, grad_accum=2, loss_mode="sample"),
             dict(stage="2", steps=2, batch_size=4, loss_mode="token")]
    runs1.append(dict(runs1[0], save_every=1))                           # the same run, checkpointed at every step
    runs2 = [dict(r, batch_size=r["batch_size"] // 2) for r in runs1]
    runs2[3]["stop_at"] = 2                                                # 2 processes: stop after step 2, resume
    _run(script, dict(model=MODEL_KW, runs=runs1, out=str(tmp_path / "w1"), tag="w1"))
    r = _run(script, dict(model=MODEL_KW, runs=runs2, out=str(tmp_path / "w2"), tag="w2"), nproc=2)
    a, b = load_file(str(tmp_path / "w1" / "result-w1.safetensors")), load_file(str(tmp_path / "w2" / "result-w2.safetensors"))
    assert set(a) == set(b)
    grads = [k for k in a if "/grad/" in k]
    assert len({k.split("/grad/")[0] for k in grads}) == 11           # 3 + 3 + 2 + 3 optimizer steps compared
    for k in grads: assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), (k, (a[k] - b[k]).abs().max())
    for k in a:
        if "/final/" in k: assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    m2 = read_metrics(tmp_path / "w2" / "run0"); assert m2[-1]["samples"] == 4      # the metrics count the global batch
    finals = [k for k in b if k.startswith("run0/final/")]
    assert finals and all(torch.equal(b[k], b[k.replace("run0/", "run3/")]) for k in finals)   # 2-process resume is exact
    ck = latest_checkpoint(tmp_path / "w2" / "run3")
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "optimizer.bin"} <= {p.name for p in ck.iterdir()}


@pytest.fixture(scope="module")
def small():
    mc = tiny_config(**MODEL_KW)
    proc = MMProcessor.from_vision_config(mc.vision_config, max_num=1)
    def model(seed=0):
        seed_everything(seed); m = MMModel(mc); fit_to_tokenizer(m, proc.tokenizer); return m
    return proc, model, [make_task("count", size=64), make_task("colour_position", size=64)]


def test_corrupt_checkpoints_name_the_file(small, tmp_path):
    proc, model, tasks = small
    cfg = dict(stage="1", steps=2, batch_size=2, progress=False)
    Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "a"), **cfg)).train()
    ck = latest_checkpoint(tmp_path / "a"); verify_checkpoint(ck)
    def resume(): Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "b"), **cfg)).train(resume=ck)
    st = ck / "model.safetensors"; good = st.read_bytes()                         # accelerate's save_state weights
    st.write_bytes(good[: len(good) // 3])                                       # truncated safetensors
    with pytest.raises(ValueError, match="model.safetensors has"): resume()
    st.write_bytes(good[:-4] + b"\x00\x00\x00\x01")                              # same size, different bytes
    with pytest.raises(ValueError, match="model.safetensors fails its SHA-256"): resume()
    st.write_bytes(good); (ck / "scheduler.bin").unlink()
    with pytest.raises(ValueError, match="scheduler.bin listed in .* is missing"): resume()
    from mmlit.train import DamagedCheckpoint
    with pytest.raises(DamagedCheckpoint): resume()                              # the kind `mmlit run` adds its advice to
    (ck / MANIFEST).unlink()
    with pytest.raises(ValueError, match="manifest .*COMPLETE is missing"): resume()
    (ck / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="COMPLETE is corrupt"): resume()
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "c"), **cfg)).train(resume=tmp_path / "nope")


def test_interrupted_write_leaves_no_checkpoint(tmp_path):
    "A writer that dies half-way leaves only a temp dir, which listing ignores and the next run removes."
    def half(d):
        (d / "a.bin").write_bytes(b"x" * 10); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): write_checkpoint(tmp_path / "checkpoints" / "step-000004", half)
    assert list_checkpoints(tmp_path) == [] and not (tmp_path / "checkpoints" / "step-000004").exists()
    stale = tmp_path / "checkpoints" / ".tmp-step-000006-abc"; stale.mkdir(); (stale / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    ok = write_checkpoint(tmp_path / "checkpoints" / "step-000002", lambda d: (d / "a.bin").write_bytes(b"abc"))
    assert latest_checkpoint(tmp_path) == ok and json.loads((ok / MANIFEST).read_text())["files"]["a.bin"]["bytes"] == 3


def test_resume_refuses_other_settings(small, tmp_path):
    proc, model, tasks = small
    Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path), stage="1", steps=2, batch_size=2, progress=False)).train()
    old = write_checkpoint(tmp_path / "old" / "checkpoints" / "step-000001",   # the layout before accelerate's save_state
                           lambda d: (d / "trainer_state.json").write_text(json.dumps(dict(step=1, world_size=1, config={}))))
    with pytest.raises(ValueError, match="older mmlit layout .*start the run without resume"):
        Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "old"), stage="1", steps=2, batch_size=2, progress=False)).train(resume=old)
    with pytest.raises(ValueError, match="settings differ.*loss_mode"):
        Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path), stage="1", steps=2, batch_size=2, loss_mode="token",
                                                  progress=False)).train(resume=True)


def test_skipped_samples_are_counted_logged_and_an_empty_dataset_stops(small, tmp_path):
    proc, model, tasks = small
    good = [tasks[0].sample(i) for i in range(6)]
    bad_image = dict(good[0], images=[str(tmp_path / "missing.png")], id="bad-image")
    bad_conv = dict(good[1], conversation=[{"role": "assistant", "content": "hi"}], id="bad-conversation")
    data = [good[0], bad_image, good[1], bad_conv, good[2], good[3]]
    Trainer(model(), proc, data, TrainConfig(output_dir=str(tmp_path / "run"), stage="1", steps=2, batch_size=2, progress=False)).train()
    log = (tmp_path / "run" / "train.log").read_text()
    assert "skip position 1" in log and "skip position 3" in log and "turns must alternate" in log
    assert read_metrics(tmp_path / "run")[-1]["skipped"] == 2
    long = TrainStream(tasks, proc, max_tokens=10, max_consecutive_skips=5)
    with pytest.raises(ValueError, match=r"no usable samples.*tokens > max_tokens=10"): long.next()
    with pytest.raises(ValueError, match="no usable samples"):
        Trainer(model(), proc, [bad_image, bad_conv], TrainConfig(output_dir=str(tmp_path / "empty"), stage="1", steps=1, batch_size=1,
                                                                  progress=False)).train()


def test_packed_training_matches_padded_loss(small, tmp_path):
    "The same samples packed or padded give the same first-step loss (block-diagonal attention, per-sample weights)."
    proc, model, tasks = small
    st = TrainStream(tasks, proc); row = sum(len(st.next()["input_ids"]) for _ in range(3))   # exactly the first 3 samples fit a row
    out = {}
    for packing in (False, True):
        c = TrainConfig(output_dir=str(tmp_path / str(packing)), stage="2", steps=1, batch_size=1 if packing else 3, packing=packing,
                        max_tokens=row, progress=False)
        Trainer(model(), proc, tasks, c).train(); out[packing] = read_metrics(tmp_path / str(packing))
    assert out[True][0]["samples"] == out[False][0]["samples"] == 3
    assert abs(out[True][0]["loss"] - out[False][0]["loss"]) < 1e-5
    assert out[True][0]["padding"] < out[False][0]["padding"] or out[False][0]["padding"] == 0


def test_lora_checkpoint_and_trackers(small, tmp_path):
    from accelerate.tracking import GeneralTracker
    class Recorder(GeneralTracker):
        name, requires_logging_directory = "recorder", False
        def __init__(self): super().__init__(); self.rows, self.config = [], None
        @property
        def tracker(self): return self
        def store_init_configuration(self, values): self.config = values
        def log(self, values, step=None, **kw): self.rows.append((step, values))
    proc, model, tasks = small
    rec = Recorder()
    tr = Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path), stage="2", lora=True, lora_r=4, steps=3, batch_size=2,
                                                   log_with=rec, progress=False))
    assert tr.trainable["vision_model"] == 0 and tr.trainable["language_model"] > 0
    tr.train()
    ck = latest_checkpoint(tmp_path)
    assert (ck / "model" / "adapter_model.safetensors").is_file() and not (ck / "model" / "model.safetensors").exists()
    assert [s for s, _ in rec.rows] == [1, 2, 3] and "loss" in rec.rows[-1][1] and rec.config["stage"] == "2"
    assert json.loads((ck / "trainer_state.json").read_text())["config"]["log_with"] == ["Recorder"]
    tr2 = Trainer(model(seed=5), proc, tasks, TrainConfig(output_dir=str(tmp_path), stage="2", lora=True, lora_r=4, steps=3, batch_size=2, progress=False))
    tr2.load(ck)
    for (n, p), q in zip(tr.unwrapped.named_parameters(), tr2.unwrapped.parameters()):
        if p.requires_grad: assert torch.equal(p, q), n


def test_scale_up_reuses_what_fits(small, tmp_path):
    from transformers import AutoModelForCausalLM
    proc, model, _ = small
    trained = model()
    same = AutoModelForCausalLM.from_config(tiny_config(**{**MODEL_KW, "text_layers": 3}).text_config)
    wider = AutoModelForCausalLM.from_config(tiny_config(**{**MODEL_KW, "text_hidden": 96}).text_config)
    m1, r1 = scale_up(trained, same, proc.tokenizer)
    m2, r2 = scale_up(trained, wider, proc.tokenizer)
    assert r1 == ["vision_model", "projector.layer_norm", "projector.linear_1", "projector.linear_2"]
    assert r2 == ["vision_model", "projector.layer_norm"]
    for m in (m1, m2):
        assert all(torch.equal(p, q) for p, q in zip(m.vision_model.parameters(), trained.vision_model.parameters()))
        assert torch.equal(m.projector.layer_norm.weight, trained.projector.layer_norm.weight)
        assert m.config.image_token_id == proc.img_context_token_id
    assert m2.projector.linear_2.out_features == 96
    with pytest.raises(ValueError, match="merge LoRA"): scale_up(stage_model(model(), "2", lora=True), same)


def test_pack_buffer_resumes_exactly(small, tmp_path):
    "Best-fit packing over a lookahead buffer: the waiting samples are saved with the checkpoint; a resumed run ends bit for bit the same."
    proc, model, tasks = small
    rc = dict(stage="2", steps=4, batch_size=2, packing=True, max_tokens=100, pack_buffer=12, save_every=2, progress=False)
    Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "straight"), **rc)).train()
    def crash(m):
        if len(read_metrics(tmp_path / "killed")) >= 3: raise RuntimeError("simulated crash")
        return {}
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(model(), proc, tasks, TrainConfig(output_dir=str(tmp_path / "killed"), eval_every=1, **rc), crash).train()
    ck = latest_checkpoint(tmp_path / "killed"); assert ck.name == "step-000002"
    waiting = torch.load(ck / "custom_checkpoint_0.pkl", weights_only=False)["ranks"][0]["stream"]["buffer"]   # the RunState
    assert waiting and all(isinstance(p, int) for p in waiting)
    Trainer(model(seed=7), proc, tasks, TrainConfig(output_dir=str(tmp_path / "killed"), **rc)).train(resume=True)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model" / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "killed") / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(r["skipped"] == 0 and r["slots"] <= 2 * 100 for r in read_metrics(tmp_path / "straight"))
    with pytest.raises(ValueError, match="pack_buffer must be an int >= 0"): TrainConfig(pack_buffer=-1)


def test_shipped_base_model_loads_and_sees():
    "The base model of the post-training chapters ships with the package, passes its manifest check and uses the image."
    from mmlit.train import load_base, base_model_dir
    from mmlit.eval import evaluate
    from mmlit.data import make_task
    model, proc = load_base()
    assert (base_model_dir() / "model.safetensors").is_file() and not model.training
    res = evaluate(model, proc, [make_task("colour_position", p_colour=1.0)], split="test", n=48, max_new_tokens=8, batch_size=48)
    assert res.accuracy() > 0.6           # chance is 1/6: well above it only if it reads the colours off the image


# ---------------------------------------------------------------- packed rows: attention one sample at a time
def _packed(proc, n=3, multiple=16):
    from mmlit.data import collate_packed, media
    samples = [proc.process(s["conversation"], **media(s), train=True, seed=i)
               for i, s in enumerate(list(make_task("count", size=64).stream("train", n)) + list(make_task("compare_count", size=64).stream("train", n)))]
    rows = [list(range(0, n)), list(range(n, 2 * n))]
    return samples, collate_packed(samples, proc.pad_token_id, max_tokens=4096, pad_to_multiple_of=multiple, packs=rows), rows


def test_packed_segments():
    from mmlit.train import packed_segments
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [1, 2, 0, 1, 2, 3, 4, 0, 0]])
    assert packed_segments(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 2), (2, 7), (7, 8), (8, 9)]]


def test_packed_attention_equals_each_sample_alone(small):
    "Per-sample attention: each packed sample's logits and loss equal the sample run alone; gradients equal the block-mask sdpa's."
    from mmlit.data import weighted_loss
    from mmlit.train import PACKED_ATTENTION, batch_weights, forward_logits, llm_attention
    proc, model, _ = small
    m = model()
    samples, b, rows = _packed(proc)
    assert (b["sample_ids"] == -1).any()   # padding at the end of a row: its own span, no labels
    with torch.no_grad():
        packed = forward_logits(m, b)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                s, n = samples[i], len(samples[i]["input_ids"])
                alone = m(input_ids=s["input_ids"][None], pixel_values=s["pixel_values"], attention_mask=torch.ones(1, n, dtype=torch.long),
                          labels=s["labels"][None])
                torch.testing.assert_close(packed[r, at:at + n], alone.logits[0], atol=1e-5, rtol=1e-5)
                w = batch_weights({"labels": b["labels"][r:r + 1, at:at + n].clone()}, "token")
                torch.testing.assert_close(weighted_loss(packed[r:r + 1, at:at + n], b["labels"][r:r + 1, at:at + n], w), alone.loss,
                                           atol=1e-5, rtol=1e-5)
                at += n
    grads = []
    for per_sample in (True, False):   # False: transformers' own path, sdpa with the block-diagonal mask
        m.zero_grad()
        logits = forward_logits(m, b) if per_sample else m(input_ids=b["input_ids"], pixel_values=b["pixel_values"],
                                                            position_ids=b["position_ids"], use_cache=False).logits
        weighted_loss(logits, b["labels"], batch_weights(b, "square")).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    top = max(float(g.abs().max()) for g in grads[1].values())
    assert set(grads[0]) == set(grads[1]) and max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[1]) <= 1e-5 * top
    impl = m.language_model.config._attn_implementation
    with llm_attention(m, PACKED_ATTENTION):
        assert m.language_model.config._attn_implementation == PACKED_ATTENTION
        assert m.vision_model.config._attn_implementation != PACKED_ATTENTION
    assert m.language_model.config._attn_implementation == impl   # restored
    with torch.no_grad(), llm_attention(m, PACKED_ATTENTION):   # padded batches and cached generation fall through to sdpa
        pb = proc.collate(samples[:2])
        torch.testing.assert_close(m(**{k: pb[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits,
                                   forward_logits(m, pb), atol=1e-6, rtol=1e-6)
