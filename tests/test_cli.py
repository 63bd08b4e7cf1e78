"""The `mmlit` console command, run as a user would run it: `mmlit tile` and the main job `mmlit run`."""
import json, os, signal, subprocess, sys, time
import yaml
from pathlib import Path
import pytest
import torch
from PIL import Image
from mmlit.main import main, shipped_recipes
from mmlit.pipeline import load_recipe, run_recipe, Recipe

MMLIT = [str(Path(sys.executable).parent / 'mmlit')]
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

def run(*args, cwd=None):
    return subprocess.run(MMLIT + list(args), capture_output=True, text=True, timeout=300, cwd=cwd, env=ENV)

# ---------------------------------------------------------------- mmlit tile

def test_tile_bundled_photo_prints_every_rule(tmp_path):
    out = tmp_path / 'grids.png'
    r = run('tile', '--out', str(out))
    assert r.returncode == 0, r.stderr
    for rule in ('internvl', 'hd', 'minicpm', 'llava', 'bluelm', 'msac'):
        assert rule in r.stdout
    assert '600 x 400' in r.stdout            # the bundled photo's size
    im = Image.open(out); im.load()
    assert im.size[0] > 1000 and im.size[1] > 600   # one panel per rule, 3 per row

def test_tile_given_image_and_rule(tmp_path):
    img = tmp_path / 'wide.png'
    Image.new('RGB', (1920, 1080), 'navy').save(img)
    r = run('tile', str(img), '--rule', 'internvl')
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith('internvl'))
    assert '4 x 2' in line and line.split()[-1] == str(256 * 9)   # 8 tiles + thumbnail, 256 tokens each

def test_tile_bad_inputs_fail_clearly(tmp_path):
    notimg = tmp_path / 'notes.jpg'; notimg.write_text('not an image')
    for path, needle in [(notimg, 'notes.jpg'), (tmp_path / 'missing.png', 'missing.png')]:
        r = run('tile', str(path))
        assert r.returncode == 2
        assert needle in r.stderr and 'Traceback' not in r.stderr
    big = tmp_path / 'big.png'; Image.new('L', (3000, 3000)).save(big)
    r = run('tile', str(big), '--max-pixels', '1000000')
    assert r.returncode == 2 and 'Traceback' not in r.stderr and 'big.png' in r.stderr

def test_unknown_rule_is_rejected():
    r = run('tile', '--rule', 'nonsense')
    assert r.returncode == 2 and "unknown rule 'nonsense'" in r.stderr and 'internvl' in r.stderr

# ---------------------------------------------------------------- mmlit run: the quick recipe end to end

@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs') / 'quick'
    r = run('run', '--recipe', 'quick', '--out', str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r

def _recipe(): return load_recipe('quick')

def test_run_prints_progress_and_a_summary(quick_run):
    out, r = quick_run
    assert f'report: {out / "report.md"}' in r.stdout
    assert 'accuracy after the last stage' in r.stdout and '| count |' in r.stdout
    assert 'stage 1.5' in r.stderr and '100%|' in r.stderr      # tqdm progress bars of the stages

def test_run_folder_contents(quick_run):
    out, _ = quick_run
    names = {p.name for p in out.iterdir()}
    assert {'recipe.yaml', 'report.md', 'metrics.jsonl', 'loss.png', 'reward.png', 'accuracy.png', 'run.log', 'model', 'stages'} <= names
    assert sorted(p.name for p in (out / 'stages').iterdir()) == ['1-stage1', '2-stage1.5', '3-stage2', '4-stagegrpo']
    for png in ('loss.png', 'reward.png', 'accuracy.png'):
        im = Image.open(out / png); im.load(); assert im.size[0] > 300 and im.size[1] > 200
    assert Recipe.from_yaml((out / 'recipe.yaml').read_text()) == _recipe()
    # checkpoints are cleaned up once a stage is finished: only the final model remains
    assert not list(out.glob('stages/*/checkpoints')) and not list(out.glob('stages/*/final'))

def test_report_judges_grounding_against_the_blind_baseline(quick_run):
    from mmlit.pipeline import grounding, blind_baselines
    out, r = quick_run
    rec = _recipe()
    blind = json.loads((out / 'blind.json').read_text())
    assert set(blind) == {t.name for t in rec.tasks} and all(b['n_test'] == rec.eval.n for b in blind.values())
    assert blind_baselines(rec, out)['count'].loss == blind['count']['loss']           # read back, not refitted
    rows = grounding(out, rec)
    assert set(rows) == set(blind) and all(isinstance(v['grounded'], bool) and v['loss'] > 0 for v in rows.values())
    report = (out / 'report.md').read_text()
    section = report.split('### Does the model use the image?')[1].split('###')[0]
    for t, v in rows.items():
        assert f'| {t} |' in section and v['sentence'] in section
    assert 'against the image-blind baseline' in r.stdout
    # the answer-loss curve of every supervised stage is in metrics.jsonl, one key per task
    curve = [x for x in (json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()) if x['kind'] == 'answer_loss']
    assert {x['stage'] for x in curve} == {'1', '1.5', '2'} and all(f'answer_loss/{t}' in x for x in curve for t in blind)

def test_a_stage_with_its_own_data(tmp_path):
    "A caption stage (stage data) before question answering: runs, reads no sample of the shared mixture, evaluates the recipe's tasks."
    d = _tiny(_recipe()).to_dict()
    d['stages'].insert(0, {'stage': '2', 'steps': 3, 'lr': 1e-3, 'batch_size': 4,
                           'data': [{'name': 'colour_position', 'captions': True, 'size': 64}, {'name': 'count', 'size': 64}]})
    rec = Recipe.from_dict(d)
    from mmlit.pipeline import run_recipe, stage_dir
    run_recipe(rec, tmp_path / 'cap', progress=False)
    log = (stage_dir(tmp_path / 'cap', rec, 0) / 'metrics.jsonl').read_text()
    assert len([l for l in log.splitlines() if '"train"' in l]) == 3
    assert (stage_dir(tmp_path / 'cap', rec, 0) / 'eval.json').is_file()

def test_report_has_every_task_and_stage(quick_run):
    out, _ = quick_run
    report = (out / 'report.md').read_text()
    table = report.split('## Accuracy after each stage')[1].split('###')[0]
    header = next(l for l in table.splitlines() if l.startswith('| task'))
    assert header.startswith('| task | chance % | after stage 1 % | after stage 1.5 % | after stage 2 % | after stage grpo % |')
    for task in ('count', 'colour_position', 'bar_chart', 'all'):
        row = next(l for l in table.splitlines() if l.startswith(f'| {task} |'))
        assert row.count('(') == 4 and '–' in row          # an accuracy with its interval per stage
    training = report.split('## Training')[1].split('## The model')[0]
    grpo_row = next(l for l in training.splitlines() if l.startswith('| 4 | grpo |'))
    assert '| 4 × 4 |' in grpo_row and 'reward ' in grpo_row      # questions x answers, reward first -> last
    assert '### GRPO' in training and '![GRPO curves](reward.png)' in training
    row = next(l for l in training.split('### GRPO')[1].splitlines() if l.startswith('| 4 |'))
    assert row.startswith('| 4 | 4 × 4 | 1.0 | 0.04 | dapo |')
    assert '## Training' in report and 'loss: first → last' in report and 'Wall time' in report
    assert 'No training sample was skipped.' in report
    assert '```yaml\nname: quick' in report                  # the recipe used

def test_metrics_jsonl(quick_run):
    out, _ = quick_run
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    rec = _recipe()
    train = [r for r in rows if r['kind'] == 'train']
    assert [r['step'] for r in train] == list(range(1, sum(s.steps for s in rec.stages) + 1))   # one axis over all stages
    assert [r['stage'] for r in train] == [s.stage for s in rec.stages for _ in range(s.steps)]
    assert all(r['loss'] > 0 for r in train if r['stage'] != 'grpo')
    grpo = [r for r in train if r['stage'] == 'grpo']
    assert [r['stage_step'] for r in grpo] == [1, 2, 3] and [r['stage_index'] for r in grpo] == [4] * 3
    for r in grpo:   # the GRPO stage's own metrics: rewards, zero-variance share, KL, clipping, answer length
        assert 0 <= r['reward'] <= 1 and r['rewards/accuracy_reward/mean'] == r['reward']
        assert 0 <= r['zero_var_frac'] <= 1 and 0 <= r['clip_region'] <= 1 and r['kl'] >= 0
        assert 1 <= r['completion_len'] <= 4 and r['step_s'] > 0
    evals = {(r['stage'], r['task']): r for r in rows if r['kind'] == 'eval'}
    assert set(evals) == {(s.stage, t) for s in rec.stages for t in ('count', 'colour_position', 'bar_chart', 'all')}
    assert all(r['n'] == rec.eval.n * (3 if r['task'] == 'all' else 1) and 0 <= r['ci_low'] <= r['accuracy'] <= r['ci_high'] <= 1
               for r in evals.values())
    # the short quick run learns the answer format: (nearly) every answer of the last evaluation parses
    assert evals[('2', 'all')]['unparsed'] <= 2 < evals[('1', 'all')]['unparsed']

def test_final_checkpoint_loads_and_answers_as_evaluated(quick_run):
    from mmlit.model import MMModel
    from mmlit.processing import MMProcessor
    from mmlit.eval import EvalResults, evaluate
    out, _ = quick_run
    rec = _recipe()
    model, proc = MMModel.from_pretrained(out / 'model'), MMProcessor.from_pretrained(out / 'model')
    again = evaluate(model, proc, [t.task() for t in rec.tasks], split=rec.eval.split, n=rec.eval.n,
                     max_new_tokens=rec.eval.max_new_tokens, batch_size=rec.eval.batch_size, seed=rec.seed)
    before = EvalResults.load(out / 'stages' / '4-stagegrpo' / 'eval.json')
    assert [r['prediction'] for r in again.records] == [r['prediction'] for r in before.records]

def _logits(model_dir):
    from mmlit.model import MMModel
    from mmlit.processing import MMProcessor
    from mmlit.data import make_task, media
    model, proc = MMModel.from_pretrained(model_dir).eval(), MMProcessor.from_pretrained(model_dir)
    s = make_task('count', size=64).sample(0, 'test')
    b = proc.collate([proc.process(s['conversation'], **media(s))])
    with torch.no_grad(): return model(**proc.model_inputs(b, labels=False)).logits

def test_killed_run_resumes_to_identical_weights(quick_run, tmp_path):
    "SIGKILL in the middle of stage 2, then --resume: the final model equals the uninterrupted run's, logits bit for bit."
    out = tmp_path / 'killed'
    p = subprocess.Popen(MMLIT + ['run', '--recipe', 'quick', '--out', str(out), '--quiet'], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = out / 'stages' / '3-stage2' / 'checkpoints' / 'step-000020'
    deadline = time.time() + 240
    while not ck.exists() and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert ck.exists() and not (out / 'model').exists(), 'the run was not interrupted in stage 2'
    r = run('run', '--recipe', 'quick', '--out', str(out))               # refused without --resume
    assert r.returncode == 2 and 'already holds a run' in r.stderr and 'Traceback' not in r.stderr
    r = run('run', '--out', str(out), '--resume', '--quiet')             # the recipe comes from the run folder
    assert r.returncode == 0, r.stderr[-3000:]
    timing = json.loads((out / 'stages' / '3-stage2' / 'timing.json').read_text())
    assert 20 <= timing['resumed_at_step'] < 80
    assert 'resuming' in (out / 'run.log').read_text()
    assert torch.equal(_logits(out / 'model'), _logits(quick_run[0] / 'model'))
    a, b = [[json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()] for d in (out, quick_run[0])]
    key = lambda rows: [(r['step'], r['loss']) for r in rows if r['kind'] == 'train']
    assert key(a) == key(b)                                             # the same losses, step for step

def _grpo_checkpoint(stage: Path) -> bool:
    "True once the GRPO stage has written a checkpoint (or finished)."
    try: return any(c.name.startswith('step-') for c in (stage / 'checkpoints').iterdir()) or (stage / 'final').is_dir()
    except FileNotFoundError: return False

def test_killed_in_grpo_stage_resumes_to_identical_weights(quick_run, tmp_path):
    "SIGKILL during (or just after) the GRPO stage, then --resume: the final model and every GRPO metric equal the uninterrupted run's."
    out = tmp_path / 'killed-grpo'
    stage = out / 'stages' / '4-stagegrpo'
    p = subprocess.Popen(MMLIT + ['run', '--recipe', 'quick', '--out', str(out), '--quiet'], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _grpo_checkpoint(stage) and p.poll() is None and time.time() < deadline: time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    assert _grpo_checkpoint(stage) and not (out / 'model').exists(), 'the run was not interrupted in the GRPO stage'
    r = run('run', '--out', str(out), '--resume', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    timing = json.loads((stage / 'timing.json').read_text())
    assert 1 <= timing['resumed_at_step'] <= 3
    assert 'resuming' in (out / 'run.log').read_text()
    assert torch.equal(_logits(out / 'model'), _logits(quick_run[0] / 'model'))
    a, b = [[json.loads(l) for l in (d / 'metrics.jsonl').read_text().splitlines()] for d in (out, quick_run[0])]
    key = lambda rows: [(r['step'], r['reward'], r['loss'], r['kl'], r['completion_len']) for r in rows if r['kind'] == 'train' and r['stage'] == 'grpo']
    assert len(key(a)) == 3 and key(a) == key(b)                          # the same rollouts, step for step
    evals = lambda rows: {(r['stage'], r['task']): r['accuracy'] for r in rows if r['kind'] == 'eval'}
    assert evals(a) == evals(b)

def test_default_recipe_ends_with_grpo_on_a_resnet_encoder():
    from mmlit.pipeline import GRPOStageRecipe, build_model
    r = load_recipe('default')
    assert [s.stage for s in r.stages] == ['1', '1.5', '2', '2', 'grpo'] and isinstance(r.stages[4], GRPOStageRecipe)
    assert r.stages[4].rewards == ['accuracy'] and r.stages[4].num_generations >= 2
    first, mix = r.stages[2].data, r.stages[3].data       # stage 2 starts on the binding task with its captions, then mixes
    assert {(t.name, t.kwargs.get('captions', False)) for t in first} == {('colour_position', False), ('colour_position', True)}
    assert {t.name for t in mix} == {t.name for t in r.tasks} and any(t.kwargs.get('captions') for t in mix)
    base = load_recipe('base')                             # the base model's recipe: the same model and data, longer, no GRPO
    assert base.model == r.model and base.tasks == r.tasks and all(s.stage != 'grpo' for s in base.stages)
    assert sum(s.steps for s in base.stages) > sum(s.steps for s in r.stages[:4])
    assert r.threads == 1 and r.model.vision_model_type == 'resnet' and not r.model.sincos_positions
    model, proc = build_model(r)
    assert type(model.vision_model).__name__ == 'ResNetModel' and model.tokens_per_tile == proc.tokens_per_tile == 16
    assert proc.jpeg_min_tile > r.model.image_size               # no per-tile JPEG on its 64-px tiles

def test_sincos_positions_change_only_the_position_table():
    from mmlit.pipeline import build_model
    from mmlit.model import init_sincos_positions
    q = load_recipe('quick')
    with_codes, _ = build_model(q)
    plain, _ = build_model(Recipe.from_dict({**q.to_dict(), 'model': {**q.to_dict()['model'], 'sincos_positions': False}}))
    pos = lambda m: m.vision_model.embeddings.position_embedding.weight
    assert not torch.equal(pos(plain), pos(with_codes))
    init_sincos_positions(plain.vision_model)                             # the only difference is the position table
    assert all(torch.equal(x, y) for x, y in zip(plain.state_dict().values(), with_codes.state_dict().values()))

def test_recipes_round_trip_and_overrides(capsys):
    for name in shipped_recipes():
        r = load_recipe(name)
        assert Recipe.from_yaml(r.to_yaml()) == r
    assert main(['run', '--list-recipes']) == 0
    assert [l.split()[0] for l in capsys.readouterr().out.splitlines()] == ['base', 'default', 'posttrain', 'quick', 'smollm2']
    assert main(['run', '--recipe', 'default', '--steps-scale', '0.1', '--tasks', 'count,digit_sum', '--seed', '7',
                 '--eval-n', '20', '--print-recipe']) == 0
    r = Recipe.from_yaml(capsys.readouterr().out)
    assert [s.steps for s in r.stages] == [2, 2, 60, 140, 4] and [t.name for t in r.tasks] == ['count', 'digit_sum']
    assert r.stages[2].data is None and [t.name for t in r.stages[3].data] == ['count']   # stage data keeps the chosen tasks
    assert (r.seed, r.eval.n) == (7, 20)
    assert r.model == load_recipe('default').model

def _tiny(recipe: Recipe, **changes) -> Recipe:
    "The recipe with 2, 2, 4 (and 2 GRPO) steps and 4 test questions per task, plus `changes` at the top level."
    d = recipe.to_dict()
    for s, n in zip(d['stages'], (2, 2, 4, 2)): s['steps'] = n
    d['eval']['n'] = 4
    return Recipe.from_dict({**d, **changes})

def test_bad_samples_are_skipped_counted_and_reported(tmp_path):
    "Samples longer than max_tokens (the long 'what colour' questions) are skipped with their reason, never silently."
    report = run_recipe(_tiny(load_recipe('quick'), max_tokens=40), tmp_path / 'skips', progress=False).read_text()
    section = report.split('Training samples skipped')[1].split('##')[0]
    assert 'tokens > max_tokens=40' in section and 'stage 3 (2)' in section
    assert 'tokens > max_tokens=40' in (tmp_path / 'skips' / 'run.log').read_text()
    rows = [json.loads(l) for l in (tmp_path / 'skips' / 'metrics.jsonl').read_text().splitlines()]
    assert max(r.get('skipped', 0) for r in rows) > 0

def test_no_usable_sample_stops_with_a_clear_error(tmp_path, capsys):
    f = tmp_path / 'short.yaml'
    f.write_text(_tiny(load_recipe('quick'), max_tokens=16).to_yaml())
    assert main(['run', '--recipe', str(f), '--out', str(tmp_path / 'empty'), '--quiet']) == 2
    err = capsys.readouterr().err
    assert 'no usable samples' in err and 'max_tokens=16' in err and 'Traceback' not in err
    assert 'stopped: no usable samples' in (tmp_path / 'empty' / 'run.log').read_text()

def test_smollm2_recipe_runs_with_lora(tmp_path):
    "The shipped SmolLM2 recipe (pretrained LLM from the installed GGUF, LoRA in stage 2), a few steps of each stage."
    pytest.importorskip('gguf')
    d = _tiny(load_recipe('smollm2')).to_dict()
    for s in d['stages']: s['batch_size'] = 2
    d['eval'].update(n=2, max_new_tokens=2)
    rec = Recipe.from_dict({**d, 'tasks': d['tasks'][:1], 'threads': 1})
    report = run_recipe(rec, tmp_path / 'smol', progress=False).read_text()
    assert '2 (LoRA)' in report and 'smollm2 backbone' in report
    from mmlit.model import MMModel
    m = MMModel.from_pretrained(tmp_path / 'smol' / 'model')
    assert not hasattr(m, 'peft_config') and m.config.text_config.hidden_size == 576   # LoRA merged into SmolLM2-135M

# ---------------------------------------------------------------- a self-evolution stage (stage: evolve)

def _evolve_recipe(**evolve) -> Recipe:
    "quick's model and tasks; stages 1 and 2 (a few steps), then a tiny evolve stage (changed by `evolve`)."
    d = load_recipe('quick').to_dict()
    stage = dict(stage='evolve', warmup_steps=2, warmup_batch_size=4, rounds=2, prompts=8, k=2, steps_per_round=1, batch_size=4,
                 select='all', max_new_tokens=12, heldout=2, **evolve)
    d['stages'] = [{'stage': '1', 'steps': 2, 'lr': 1e-3, 'batch_size': 8}, {'stage': '2', 'steps': 4, 'lr': 3e-3, 'batch_size': 8}, stage]
    d['eval']['n'] = 4
    return Recipe.from_dict({**d, 'name': 'evolve-tiny'})

def _evolve_error(base: dict | None = None, **change) -> str:
    "The error of the tiny evolve recipe (or of `base`, its plain dict) after `change` to the evolve stage."
    d = base or _evolve_recipe().to_dict(); d['stages'][2].update(change)
    with pytest.raises(ValueError) as e: Recipe.from_dict(d)
    return str(e.value)

def test_evolve_stage_parses_and_rejects_bad_values(monkeypatch):
    from mmlit.pipeline import EvolveStageRecipe, apply_overrides
    r = _evolve_recipe()
    s = r.stages[2]
    assert isinstance(s, EvolveStageRecipe) and s.stage == 'evolve' and Recipe.from_yaml(r.to_yaml()) == r
    assert (s.steps, s.peak_lr) == (2 + 2 * 1, s.lr)                       # warm-up + rounds x steps per round
    bad = {'rounds': (0, "stages[2].rounds must be a positive integer, got 0"),
           'k': ('many', "stages[2].k must be an integer, got 'many'"),
           'keep': (3, "stages[2].keep must be <= k (responses per question), got keep=3 and k=2"),
           'round_fraction': (1.5, "stages[2].round_fraction must be in (0, 1], got 1.5"),
           'warmup_steps': (-1, "stages[2].warmup_steps must be an integer >= 0, got -1"),
           'heldout': (-2, "stages[2].heldout must be an integer >= 0, got -2"),
           'prm_prompts': (-1, "stages[2].prm_prompts must be an integer >= 0, got -1"),
           'lr': (0, "stages[2].lr must be > 0, got 0.0"),
           'warmup_lr': (-1e-3, "stages[2].warmup_lr must be > 0, got -0.001"),
           'temperature': (0, "stages[2].temperature must be > 0, got 0.0"),
           'tasks': ([], "stages[2].tasks must name at least one task"),
           'variant': ('rft', "stages[2].variant must be one of ('continuous', 'iterative', 'restem'), got 'rft'"),
           'select': ('best', "stages[2].select must be one of ('top', 'random', 'all'), got 'best'")}
    for key, (value, message) in bad.items():
        assert _evolve_error(**{key: value}).startswith(message), (key, _evolve_error(**{key: value}))
    assert _evolve_error(select='top').startswith("stages[2].select 'top' ranks the right responses by a process reward model: set prm_prompts > 0")
    assert 'set prm_prompts > 0 and heldout > 0' in _evolve_error(auto_temperature=True, prm_prompts=4, heldout=0)
    for key in ('steps', 'num_generations', 'lora'):                         # derived, or another kind of stage's key
        assert _evolve_error(**{key: 2}).startswith(f"unknown recipe key 'stages[2].{key}'; the keys of stages[2] are ['stage', 'warmup_steps'")
    assert _evolve_error(tasks=['digit_sum']) == "stages[2].tasks[0] 'digit_sum' is not one of the recipe's tasks ['count', 'colour_position', 'bar_chart']"
    from mmlit.data import Task, make_task
    base = r.to_dict()
    monkeypatch.setattr(type(make_task('bar_chart')), 'describe', Task.describe)   # a task without gold reasoning
    assert _evolve_error(base).startswith("stages[2] (evolve) would train on task 'bar_chart', which has no gold reasoning")
    assert Recipe.from_dict({**base, 'stages': [{**base['stages'][2], 'tasks': ['count']}]}).stages[0].tasks == ['count']
    monkeypatch.undo()
    scaled = apply_overrides(r, steps_scale=2).stages[2]                      # --steps-scale: the rounds and the warm-up
    assert (scaled.rounds, scaled.warmup_steps, scaled.steps_per_round) == (4, 4, 1)

def test_evolve_stage_reads_questions_no_other_stage_read():
    from mmlit.pipeline import evolve_data, evolve_heldout, grpo_prompts, train_mixture, eval_settings
    from mmlit.evolve import THINK_SUFFIX
    d = _evolve_recipe(prm_prompts=6).to_dict()
    d['stages'].append({'stage': 'grpo', 'steps': 2, 'prompts_per_step': 3})
    r = Recipe.from_dict(d)
    ed, mix = evolve_data(r, 2), train_mixture(r)
    ids = lambda seq: [seq[k]['id'] for k in range(len(seq))]
    parts = [ids(mix), ids(ed['warmup']), ids(ed['prm']), ids(ed['pool']), ids(grpo_prompts(r, 3))]
    assert [len(p) for p in parts[1:4]] == [8 + 1, 6, 9]                     # each split over 3 equal-weight tasks, rounded up
    assert len(set().union(*parts)) == sum(len(p) for p in parts)             # no question is read twice
    w = ed['warmup'][0]['conversation']
    assert w[0]['content'].endswith(THINK_SUFFIX) and w[1]['content'].startswith('<think>\n') and w[1]['content'].endswith('</answer>')
    held, tune = evolve_heldout(r, 2)
    assert len(held) == 3 * 2 and tune == [] and {q['split'] for q in held} == {'validation'}
    assert eval_settings(r, 1)['suffix'] == '' and eval_settings(r, 3) == dict(suffix=THINK_SUFFIX, kind='tag', max_new_tokens=12)

def _parity_reward(prompts, completions, **columns):
    "A stand-in checker for the tiny untrained model (which never writes an <answer> tag): right when the response has an even length."
    return [float(len(c) % 2 == 0) for c in completions]

@pytest.fixture(scope='module')
def evolve_run(tmp_path_factory):
    "`mmlit run` of the tiny evolve recipe, its checker replaced so that some responses are right (the loop trains)."
    out = tmp_path_factory.mktemp('runs') / 'evolve'
    f = out.parent / 'evolve.yaml'; f.write_text(_evolve_recipe().to_yaml())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr('mmlit.evolve.tag_accuracy', _parity_reward)
        assert main(['run', '--recipe', str(f), '--out', str(out), '--quiet']) == 0
    return out, f

def test_evolve_run_report_and_stage_folder(evolve_run):
    from mmlit.eval import EvalResults
    from mmlit.evolve import THINK_SUFFIX
    out, _ = evolve_run
    stage = out / 'stages' / '3-stageevolve'
    rounds = [json.loads(l) for l in (stage / 'metrics.jsonl').read_text().splitlines()]
    assert [r['round'] for r in rounds] == [0, 1, 2] and all(0 <= r['greedy'] <= 1 and 'pass_at_k' in r for r in rounds)
    assert all(r['kept'] > 0 and r['sft_loss'] > 0 for r in rounds[1:])       # the loop trained on the responses it kept
    assert len((stage / 'warmup' / 'metrics.jsonl').read_text().splitlines()) == 2   # the warm-up's two steps
    assert json.loads((stage / 'timing.json').read_text())['resumed_at_round'] == 0
    ev = EvalResults.load(stage / 'eval.json')                                # evaluated with reasoning, the stage's budget
    assert (ev.config['suffix'], ev.config['max_new_tokens']) == (THINK_SUFFIX, 12) and {m['kind'] for m in ev.tasks.values()} == {'tag'}
    report = (out / 'report.md').read_text()
    assert 'From stage 3 (evolve) on, the model reasons before it answers' in report
    section = report.split('### Self-evolution')[1].split('## The model')[0]
    assert '![self-evolution curves](evolve.png)' in section and '| round | T | greedy % | count % |' in section
    assert [l.split('|')[1].strip() for l in section.splitlines() if l.startswith('| ') and l[2].isdigit()] == ['0', '1', '2']
    assert next(l for l in report.splitlines() if l.startswith('| 3 | evolve | 4 |'))
    im = Image.open(out / 'evolve.png'); im.load(); assert im.size[0] > 600
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    evo = [r for r in rows if r['kind'] == 'evolve']                           # round r at step 6 + 2 + r on the run's axis
    assert [(r['round'], r['step'], r['stage_step']) for r in evo] == [(0, 8, 2), (1, 9, 3), (2, 10, 4)]
    assert [r['step'] for r in rows if r['kind'] == 'train'] == list(range(1, 9))   # stages 1, 2 and the warm-up

def test_evolve_run_interrupted_resumes_without_redoing_rounds(evolve_run, tmp_path, monkeypatch):
    "Stopped after the loop's first round: its checkpoint is in the stage folder; --resume runs round 2 only and ends as the uninterrupted run."
    from safetensors.torch import load_file
    from mmlit.evolve import SelfEvolver
    done, f = evolve_run
    out, stage = tmp_path / 'evolve', tmp_path / 'evolve' / 'stages' / '3-stageevolve'
    monkeypatch.setattr('mmlit.evolve.tag_accuracy', _parity_reward)
    save = SelfEvolver.save
    def save_then_stop(self):
        p = save(self)
        if self.round == 1: raise RuntimeError('stopped after round 1')
        return p
    monkeypatch.setattr(SelfEvolver, 'save', save_then_stop)
    with pytest.raises(RuntimeError, match='stopped after round 1'): main(['run', '--recipe', str(f), '--out', str(out), '--quiet'])
    assert (stage / 'checkpoints' / 'step-000001' / 'model.safetensors').is_file() and not (out / 'model').exists()
    first = (stage / 'metrics.jsonl').read_text().splitlines()
    monkeypatch.setattr(SelfEvolver, 'save', save)
    assert main(['run', '--out', str(out), '--resume', '--quiet']) == 0
    lines = (stage / 'metrics.jsonl').read_text().splitlines()
    assert lines[:2] == first and len(lines) == 3                              # rounds 0 and 1 untouched, round 2 added
    assert json.loads((stage / 'timing.json').read_text())['resumed_at_round'] == 1
    assert 'stage evolve: 1 rounds (' in (out / 'run.log').read_text()
    a, b = load_file(str(out / 'model' / 'model.safetensors')), load_file(str(done / 'model' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # as if never stopped
    same = lambda l: {k: v for k, v in json.loads(l).items() if not k.endswith('_s') and k != 'responses_per_s'}
    assert [same(l) for l in lines] == [same(l) for l in (done / 'stages' / '3-stageevolve' / 'metrics.jsonl').read_text().splitlines()]

def test_evolve_run_resumed_when_finished_redoes_nothing(evolve_run):
    out, _ = evolve_run
    stage = out / 'stages' / '3-stageevolve'
    before = (stage / 'metrics.jsonl').read_text(), (stage / 'eval.json').read_text()
    assert main(['run', '--out', str(out), '--resume', '--quiet']) == 0
    assert ((stage / 'metrics.jsonl').read_text(), (stage / 'eval.json').read_text()) == before
    assert 'every stage is finished' in (out / 'run.log').read_text() and '### Self-evolution' in (out / 'report.md').read_text()


# ---------------------------------------------------------------- GRPO on chosen difficulty tiers (chapter 09)
def test_grpo_stage_tiers_are_checked_and_widen_the_pool():
    from mmlit.pipeline import _grpo_share
    base = load_recipe("quick").to_dict()
    g = {"stage": "grpo", "steps": 2, "prompts_per_step": 2, "num_generations": 2}
    plain = Recipe.from_dict({**base, "stages": base["stages"] + [g]})
    tiered = Recipe.from_dict({**base, "stages": base["stages"] + [{**g, "tiers": ["medium", "hard"], "tier_pool": 3}]})
    i = len(base["stages"])
    a, b = _grpo_share(plain, i), _grpo_share(tiered, i)   # 4 questions over 3 tasks, then 12: ceil(4/3) = 2 each, then 4 each
    assert a == {t.name: 2 for t in plain.tasks} and b == {t.name: 4 for t in plain.tasks}
    for bad, msg in [({"tiers": ["hardest"]}, "tiers must list"), ({"tiers": []}, "tiers must list"),
                     ({"tiers": ["hard"], "tier_by": "attention"}, "tier_by must be one of"), ({"tier_pool": 0}, "tier_pool")]:
        with pytest.raises(ValueError, match=msg): Recipe.from_dict({**base, "stages": base["stages"] + [{**g, **bad}]})


def test_tiered_prompts_scores_and_keeps_the_chosen_tiers(tmp_path):
    from mmlit.pipeline import GRPOStageRecipe, tiered_prompts
    from mmlit.data import make_task
    from mmlit.model import MMModel, fit_to_tokenizer, tiny_config
    from mmlit.processing import MMProcessor, tiny_tokenizer
    from mmlit.train import RunLog
    tok = tiny_tokenizer()
    cfg = tiny_config(image_size=32, patch_size=8, vision_hidden=64, vision_layers=1, text_hidden=64, text_layers=3,
                      vision_model_type="siglip_vision_model")
    torch.manual_seed(0); model = MMModel(cfg); fit_to_tokenizer(model, tok); model.eval()
    proc = MMProcessor.from_vision_config(cfg.vision_config, tok, max_num=1, use_thumbnail=False)
    prompts = list(make_task("count", size=32).stream("train", 3))
    kept = tiered_prompts(model, proc, prompts, GRPOStageRecipe(tiers=["unsolved", "hard", "medium", "easy"]), tmp_path, RunLog(None))
    info = json.loads((tmp_path / "tiers.json").read_text())
    assert [k["id"] for k in kept] == [p["id"] for p in prompts] and sum(info["counts"].values()) == 3
    assert all(k["pism_tier"] in info["counts"] for k in kept)
    unsolved = [k for k in kept if k["pism_tier"] == "unsolved"]
    if len(unsolved) < 3:   # keeping one tier keeps exactly its questions
        assert len(tiered_prompts(model, proc, prompts, GRPOStageRecipe(tiers=["unsolved"]), tmp_path, RunLog(None))) == len(unsolved)


def test_grpo_stage_can_name_the_jigsaw_and_tag_rewards():
    from mmlit.pipeline import REWARDS, GRPOStageRecipe
    from mmlit.jigsaw import jigsaw_reward
    s = GRPOStageRecipe(rewards=["jigsaw_paper", "order_format", "tag"], reward_weights=[1.0, 0.1, 0.5])
    r = REWARDS["jigsaw_paper"](None, ["<answer>1 0 2 3</answer>", "0 1 2 3"], answer=["0,1,2,3", "0,1,2,3"])
    assert r == [jigsaw_reward([1, 0, 2, 3], [0, 1, 2, 3]), 1.0] and s.rewards[0] == "jigsaw_paper"
    assert REWARDS["tag"](None, ["<think>\nx\n</think><answer>3</answer>", "3"], answer=["3", "3"]) == [1.0, 0.0]
    assert REWARDS["jigsaw_repeat"](None, ["1 1 2 3", "1 0 2 3"], answer=["0,1,2,3"] * 2) == [-0.5, 0.0]

# ---------------------------------------------------------------- a message, not a traceback

def _fails(argv, capsys, *needles, code=2):
    "Run `mmlit argv` in-process; it must exit with `code` and a message holding every needle, no traceback."
    try: rc = main(argv)
    except SystemExit as e: rc = e.code
    err = capsys.readouterr().err
    assert rc == code, (rc, err)
    for n in needles: assert n in err, (n, err)
    assert 'Traceback' not in err
    return err

def test_tile_out_must_be_a_writable_picture_file(tmp_path, capsys):
    _fails(['tile', '--rule', 'internvl', '--out', str(tmp_path)], capsys, 'is a folder', 'tiles.png')
    blocker = tmp_path / 'file'; blocker.write_text('x')
    _fails(['tile', '--rule', 'internvl', '--out', str(blocker / 'grid.png')], capsys, 'cannot create the folder')
    _fails(['tile', '--rule', 'internvl', '--out', str(tmp_path / 'grid.xyz')], capsys, 'cannot write .xyz pictures', '.png')
    assert main(['tile', '--rule', 'internvl', '--out', str(tmp_path / 'grid')]) == 0
    assert f"wrote {tmp_path / 'grid.png'}" in capsys.readouterr().out
    Image.open(tmp_path / 'grid.png').verify()

def test_tile_draws_a_huge_image_from_a_small_copy():
    from mmlit.cli import draw_rules
    big = Image.new('RGB', (9000, 6000), 'teal')
    fig = draw_rules(big, rules=['internvl', 'hd'])
    shown = [ax.images[0].get_array().shape for ax in fig.axes if ax.images]
    assert shown and all(max(s[:2]) <= 1600 for s in shown), shown
    assert fig.axes[0].get_xlim()[1] > 8000   # the boxes are drawn in the full image's coordinates

def test_absurd_numbers_are_refused_with_their_bounds(tmp_path, capsys):
    _fails(['run', '--steps-scale', 'inf'], capsys, 'above 0 and at most 1000')
    _fails(['run', '--threads', '100000'], capsys, 'cores of this machine')
    d = load_recipe('quick').to_dict(); d['stages'][0]['steps'] = 10_000_000_000_000
    f = tmp_path / 'huge.yaml'; f.write_text(yaml.safe_dump(d))
    _fails(['run', '--recipe', str(f), '--print-recipe'], capsys, 'steps = 10,000,000,000,000', 'typo')
    too_many = Recipe.from_dict({**load_recipe('quick').to_dict(), 'threads': (os.cpu_count() or 1) + 1})
    with pytest.raises(ValueError, match='more than the .* cores'): run_recipe(too_many, tmp_path / 'threads', progress=False)
    assert not (tmp_path / 'threads').exists()

def test_recipe_file_that_is_not_utf8_is_named(tmp_path, capsys):
    f = tmp_path / 'latin1.yaml'; f.write_bytes('name: caf\xe9\n'.encode('latin-1'))
    _fails(['run', '--recipe', str(f), '--print-recipe'], capsys, str(f), 'not UTF-8')

def test_a_text_model_is_not_a_vision_encoder():
    d = load_recipe('quick').to_dict(); d['model']['vision_model_type'] = 'bert'
    with pytest.raises(ValueError, match="'bert' is not a vision model"): Recipe.from_dict(d)
    for ok in ('siglip_vision_model', 'clip_vision_model', 'internvl_vision', 'resnet'):
        d['model']['vision_model_type'] = ok; Recipe.from_dict(d)

def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import mmlit.pipeline as pipeline
    def broken(recipe): raise ValueError('cannot build this model')
    monkeypatch.setattr(pipeline, 'build_model', broken)
    out = tmp_path / 'never'
    _fails(['run', '--recipe', 'quick', '--out', str(out), '--quiet'], capsys, 'cannot build this model')
    assert not out.exists()

def test_two_runs_on_one_folder_the_second_is_refused(tmp_path, capsys):
    from mmlit.pipeline import run_lock
    out = tmp_path / 'busy'
    with run_lock(out):
        _fails(['run', '--recipe', 'quick', '--out', str(out), '--quiet'], capsys, 'another mmlit run', str(os.getpid()), str(out))
        assert not out.exists()
    with run_lock(out): pass   # released: the folder can be used again

def test_two_run_processes_one_is_refused(tmp_path):
    "Two real `mmlit run` on the same folder at once: one finishes, the other is refused by the lock."
    out = tmp_path / 'race'
    procs = [subprocess.Popen(MMLIT + ['run', '--recipe', 'quick', '--out', str(out), '--quiet', '--steps-scale', '0.1'],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    res = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in res)
    assert codes == [0, 2], res
    err = next(e for rc, e in res if rc == 2)
    assert ('another mmlit run' in err or 'already holds a run' in err) and 'Traceback' not in err

def test_damaged_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    import mmlit.cli as cli
    from mmlit.train import DamagedCheckpoint
    def damaged(*a, **k): raise DamagedCheckpoint(f"checkpoint file {tmp_path}/x/model.safetensors fails its SHA-256 check (corrupt or modified)")
    monkeypatch.setattr(cli, 'run_recipe', damaged)
    _fails(['run', '--recipe', 'quick', '--out', str(tmp_path / 'r')], capsys, 'SHA-256', "delete that checkpoint's folder",
           f"mmlit run --out {tmp_path / 'r'} --resume")

def test_ctrl_c_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    import mmlit.cli as cli
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'run_recipe', interrupted)
    _fails(['run', '--recipe', 'quick', '--out', str(tmp_path / 'r')], capsys, 'interrupted', f"mmlit run --out {tmp_path / 'r'} --resume", code=130)

def test_help_answers_without_loading_torch():
    probe = "import sys, mmlit.main as m; m.build_parser().format_help(); print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, check=True).stdout.split() == ['False', 'False']
    r = run('--help')
    assert r.returncode == 0 and 'ask' in r.stdout and 'run' in r.stdout

# ---------------------------------------------------------------- mmlit ask

@pytest.fixture(scope='module')
def count_question(tmp_path_factory):
    from mmlit.data import make_task
    s = make_task('count').sample(3, 'test')
    img = tmp_path_factory.mktemp('ask') / 'count.png'; s['images'][0].save(img)
    return img, s['conversation'][0]['content'].replace('<image>\n', ''), s

def test_ask_answers_like_evaluate(count_question):
    "`mmlit ask` on the shipped base model gives the answer the Python route (processor → generate) gives."
    from mmlit.cli import ask
    from mmlit.pipeline import load_trained
    from mmlit.train import base_model_dir
    img, q, s = count_question
    r = run('ask', str(base_model_dir()), str(img), q)
    assert r.returncode == 0, r.stderr
    model, proc = load_trained(base_model_dir())
    assert r.stdout.strip() == ask(model, proc, Image.open(img).convert('RGB'), q)
    assert r.stdout.strip().isdigit()
    assert 'Loading weights' not in r.stderr, r.stderr   # the answer alone: no progress bar

def test_ask_chat_reads_questions_until_an_empty_line(count_question, monkeypatch, capsys):
    from mmlit.train import base_model_dir
    img, q, _ = count_question
    lines = iter([q, q, ''])
    monkeypatch.setattr('builtins.input', lambda prompt='': next(lines))
    assert main(['ask', str(base_model_dir()), str(img), '--chat']) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == 2 and out[0] == out[1]

def test_ask_bad_inputs(tmp_path, count_question, capsys):
    from mmlit.train import base_model_dir
    img, q, _ = count_question
    _fails(['ask', str(tmp_path / 'no-run' / 'model'), str(img), q], capsys, 'no model folder')
    _fails(['ask', str(base_model_dir()), str(tmp_path / 'missing.png'), q], capsys, 'missing.png')
    _fails(['ask', str(base_model_dir()), str(img)], capsys, 'give a question')
    empty = tmp_path / 'empty'; empty.mkdir()
    _fails(['ask', str(empty), str(img), q], capsys, 'no model in')

def test_report_python_snippet_runs_as_written(quick_run, tmp_path, count_question):
    "The report's 'The model' code (Auto classes → processor → generate → batch_decode) runs as printed."
    import re, runpy
    out, _ = quick_run
    report = (out / 'report.md').read_text()
    code = re.search(r'## The model.*?```python\n(.*?)```', report, flags=re.S).group(1)
    img, _, _ = count_question
    script = tmp_path / 'snippet.py'; script.write_text(code.replace('picture.png', str(img)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().startswith("['") and 'mmlit ask' in report

def test_damaged_stage_evaluation_is_reported_before_anything_runs(quick_run, tmp_path):
    import shutil
    src, _ = quick_run
    out = tmp_path / 'copy'; shutil.copytree(src, out)
    f = out / 'stages' / '2-stage1.5' / 'eval.json'; f.write_text(f.read_text()[:100])
    before = (out / 'report.md').read_text()
    r = run('run', '--out', str(out), '--resume', '--quiet')
    assert r.returncode == 2 and 'evaluation after stage 2 is damaged' in r.stderr and f"delete {f}" in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr and (out / 'report.md').read_text() == before
    f.unlink()
    r = run('run', '--out', str(out), '--resume', '--quiet')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '**Not evaluated**: stage 2 (1.5)' in (out / 'report.md').read_text()

# ---------------------------------------------------------------- post-training a trained model (init)

def test_posttrain_recipe_starts_from_the_base_model_and_evaluates_it_first(tmp_path):
    "`init: base`: no model is built; the start is evaluated, GRPO runs on the tiered questions, the report compares."
    from mmlit.pipeline import load_trained
    from mmlit.train import base_model_dir
    out = tmp_path / 'pt'
    r = run('run', '--recipe', 'posttrain', '--out', str(out), '--steps-scale', '0.05', '--eval-n', '12', '--quiet')
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'at the start (base)' in (out / 'run.log').read_text()
    report = (out / 'report.md').read_text()
    assert 'Started from the trained model `base`' in report and '| start % | after stage grpo % |' in report
    assert (out / 'stages' / '1-stagegrpo' / 'tiers.json').is_file()
    after, proc = load_trained(out / 'model')
    assert type(proc).__name__ == 'MMProcessor' and after.tokens_per_tile == proc.tokens_per_tile
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    steps = load_recipe('posttrain').stages[0].steps
    assert len([r for r in rows if r.get('kind') == 'train' and r.get('stage') == 'grpo']) == max(1, round(steps * 0.05))

def test_init_must_name_a_model_folder(tmp_path, capsys):
    _fails(['run', '--recipe', 'quick', '--init', str(tmp_path / 'nope'), '--print-recipe'], capsys, 'is not a model folder')
    assert main(['run', '--recipe', 'quick', '--init', 'base', '--print-recipe']) == 0
    assert 'init: base' in capsys.readouterr().out

def test_grpo_stage_can_prefill_each_question_once(tmp_path):
    "A GRPO stage with shared_prompt runs through the recipe pipeline and its config reaches the trainer."
    from mmlit.pipeline import grpo_config
    d = load_recipe('quick').to_dict()
    d['stages'] = [s for s in d['stages'] if s['stage'] != 'grpo'][:1] + [{**[s for s in d['stages'] if s['stage'] == 'grpo'][0], 'steps': 2, 'shared_prompt': True}]
    d['eval']['n'] = 4
    r = Recipe.from_dict(d)
    assert grpo_config(r, 1, tmp_path).shared_prompt is True and grpo_config(r, 1, tmp_path).sampler == 'inverse_cdf'
    report = run_recipe(r, tmp_path / 'shared', progress=False).read_text()
    assert 'after stage grpo' in report
    with pytest.raises(ValueError, match='sampler must be one of'): Recipe.from_dict({**d, 'stages': [{**d['stages'][1], 'sampler': 'greedy'}]})

def test_old_checkpoint_layout_message_is_not_the_damaged_advice(tmp_path, monkeypatch, capsys):
    "A checkpoint written before the save_state layout: its own message, not 'delete that checkpoint's folder'."
    import mmlit.cli as cli
    msg = f"checkpoint {tmp_path}/x is in an older mmlit layout (model/ + optimizer.pt), which this version cannot resume"
    def old(*a, **k): raise ValueError(msg)
    monkeypatch.setattr(cli, 'run_recipe', old)
    assert main(['run', '--recipe', 'quick', '--out', str(tmp_path / 'r'), '--resume']) == 2
    err = capsys.readouterr().err
    assert 'older mmlit layout' in err and "delete that checkpoint's folder" not in err

def test_grpo_on_video_jigsaws_through_a_recipe(tmp_path):
    "`mmlit run` end to end on video prompts: a supervised stage, then GRPO with the jigsaw rewards, evaluated and reported."
    d = load_recipe('quick').to_dict()
    d['tasks'] = [{'name': 'jigsaw_video', 'weight': 1.0, 'size': 64, 'level': 0}]
    grpo = [s for s in d['stages'] if s['stage'] == 'grpo'][0]
    d['stages'] = [{'stage': '2', 'steps': 2, 'lr': 1e-3, 'batch_size': 4},
                   {**grpo, 'steps': 2, 'prompts_per_step': 2, 'num_generations': 2, 'max_new_tokens': 8,
                    'rewards': ['jigsaw_paper', 'order_format'], 'reward_weights': [1.0, 0.1]}]
    d['eval']['n'] = 4
    d['eval']['max_new_tokens'] = 8
    out = tmp_path / 'video'
    report = run_recipe(Recipe.from_dict(d), out, progress=False).read_text()
    assert 'jigsaw_video' in report and 'after stage grpo' in report
    rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    grpo_rows = [r for r in rows if r.get('kind') == 'train' and r.get('stage') == 'grpo']
    assert len(grpo_rows) == 2 and all('rewards/jigsaw_paper/mean' in r or any('jigsaw' in k for k in r) for r in grpo_rows)
