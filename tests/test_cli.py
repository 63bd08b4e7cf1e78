"""The `mmlit` console command, run as a user would run it: `mmlit tile` and the main job `mmlit run`."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from PIL import Image
from mmlit.cli import main, load_recipe, run_recipe, Recipe, shipped_recipes

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
    assert r.returncode == 2 and 'invalid choice' in r.stderr

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
    from mmlit.cli import grounding, blind_baselines
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
    from mmlit.cli import run_recipe, stage_dir
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
    from mmlit.cli import GRPOStageRecipe, build_model
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
    from mmlit.cli import build_model
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
    assert [l.split()[0] for l in capsys.readouterr().out.splitlines()] == ['base', 'default', 'quick', 'smollm2']
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
