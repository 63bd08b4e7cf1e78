"""The `mmlit` console command, run as a user would run it."""
import subprocess, sys
from pathlib import Path
from PIL import Image

MMLIT = [str(Path(sys.executable).parent / 'mmlit')]

def run(*args, cwd=None):
    return subprocess.run(MMLIT + list(args), capture_output=True, text=True, timeout=300, cwd=cwd)

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
