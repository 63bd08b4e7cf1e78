"""The docs site: built offline from the notebooks, links resolve, and the tiling page renders in headless Chromium."""
import os, re, shutil, subprocess, sys
from html.parser import HTMLParser
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
import build_docs

CHROMIUM_FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic']

class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.ids, self.imgs = [], set(), []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
        if tag == 'img': self.imgs.append(a.get('src', ''))

def _parse(path: Path) -> _Links:
    p = _Links(); p.feed(path.read_text(encoding='utf-8')); return p

@pytest.fixture(scope='module')
def site():
    "Build the site in a separate process: nbdev runs the notebooks' exported cells while it renders the API docs,"
    "which would re-register mmlit's classes with transformers' Auto classes inside this test process."
    out = ROOT / 'docs'
    r = subprocess.run([sys.executable, str(ROOT / 'tools' / 'build_docs.py'), str(out)], capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    pages = [Path(l) for l in r.stdout.split() if l.endswith('.html')]
    return out, pages

def test_every_sidebar_page_is_built(site):
    out, pages = site
    names = {p.name for p in pages}
    assert {'index.html', 'core.html', 'tiling.html'} <= names, names
    assert len(pages) == len(build_docs._sidebar(ROOT / 'nbs'))

def test_internal_links_resolve(site):
    out, pages = site
    parsed = {p.name: _parse(p) for p in pages}
    broken, checked = [], 0
    for name, p in parsed.items():
        for href in p.hrefs:
            if re.match(r'^[a-z]+:', href) or href.startswith('#cell-id'): continue
            page, _, anchor = href.partition('#')
            page = page or name
            checked += 1
            if page not in parsed: broken.append(f'{name}: {href} (no page)')
            elif anchor and anchor not in parsed[page].ids: broken.append(f'{name}: {href} (no anchor)')
    assert checked > 10
    assert not broken, broken

def test_tiling_page_has_api_docs_and_a_figure(site):
    out, _ = site
    p = _parse(out / 'tiling.html')
    for name in ('internvl_grid', 'hd_grid', 'minicpm_grid', 'plan_tiles', 'tile_image', 'load_image'):
        assert name in p.ids, f'no API doc section for {name}'
    assert any(src.startswith('data:image/png') for src in p.imgs), 'no figure on the tiling page'

def _chromium():
    return next((p for p in map(shutil.which, ('chromium', 'chromium-browser', 'google-chrome')) if p), None)

def test_tiling_page_renders_in_chromium(site, tmp_path):
    exe = _chromium()
    if exe is None:
        if os.environ.get('CI'): pytest.fail('chromium is not installed (tools/ensure_chromium.sh installs it as root)')
        pytest.skip('chromium is not installed')
    out, _ = site
    url = (out / 'tiling.html').resolve().as_uri()
    shot = ROOT / 'artifacts' / 'docs_tiling.png'
    shot.parent.mkdir(exist_ok=True)
    common = CHROMIUM_FLAGS + [f'--user-data-dir={tmp_path / "profile"}']
    dom = subprocess.run([exe, *common, '--dump-dom', url], capture_output=True, text=True, timeout=120).stdout
    assert 'internvl_grid' in dom and '<img' in dom, 'the rendered DOM lacks the API docs or figures'
    subprocess.run([exe, *common, f'--screenshot={shot}', '--window-size=1280,1600', '--hide-scrollbars', url],
                   capture_output=True, timeout=120)
    from PIL import Image, ImageStat
    img = Image.open(shot).convert('L')
    assert img.size == (1280, 1600)
    assert ImageStat.Stat(img).stddev[0] > 5, 'the screenshot is blank'

def test_render_math_makes_mathml_and_leaves_code_alone():
    out = build_docs.render_math(r"ratio $\rho = e^x$ and `cost $5 $x$` then $$\frac{a}{b}$$ end")
    assert out.count('<math') == 2 and 'display="block"' in out and '<mfrac>' in out
    assert '`cost $5 $x$`' in out, 'code spans must stay as written'
    assert '$' not in out.replace('`cost $5 $x$`', '')

def _visible_text(dom: str) -> str:
    dom = re.sub(r'<(script|style|math)\b.*?</\1>', ' ', dom, flags=re.S | re.I)
    dom = re.sub(r'<(pre|code)\b.*?</\1>', ' ', dom, flags=re.S | re.I)   # code may hold a literal $
    return re.sub(r'<[^>]+>', ' ', dom)

def test_grpo_maths_renders_offline_in_chromium(site, tmp_path):
    "The GRPO page's formulas are MathML elements in the rendered page, no raw $…$ is left, and no script loads from a CDN."
    exe = _chromium()
    if exe is None:
        if os.environ.get('CI'): pytest.fail('chromium is not installed (tools/ensure_chromium.sh installs it as root)')
        pytest.skip('chromium is not installed')
    out, _ = site
    page = (out / 'grpo.html').read_text(encoding='utf-8')
    assert not re.findall(r'<script[^>]+src="https?://', page), 'a script loads from the network'
    common = CHROMIUM_FLAGS + [f'--user-data-dir={tmp_path / "profile"}']
    dom = subprocess.run([exe, *common, '--dump-dom', (out / 'grpo.html').resolve().as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('<math') >= 10, 'the formulas are not MathML elements'
    assert '<mfrac>' in dom or '<msub>' in dom
    raw = re.findall(r'\$[^$]{1,200}\$', _visible_text(dom))
    assert not raw, f'raw LaTeX on the page: {raw[:3]}'

def test_subtitles_render_code_not_backticks(site):
    out, _ = site
    page = (out / 'cli.html').read_text(encoding='utf-8')
    sub = re.search(r'<p class="description">(.*?)</p>', page).group(1)
    assert '`' not in sub and '<code>mmlit</code>' in sub, sub

def test_readme_quick_start_has_the_two_commands_ci_runs():
    readme = (ROOT / 'README.md').read_text()
    block = re.search(r'## Quick start.*?```sh\n(.*?)```', readme, flags=re.S).group(1)
    cmds = [l.split('#')[0].strip() for l in block.strip().splitlines()]
    assert cmds == ['make run', 'make test']
    ci = [l.strip() for l in (ROOT / '.ci' / 'run').read_text().splitlines() if l.strip() and not l.startswith('#')]
    assert ci[-1] == cmds[1], 'CI must run exactly the README test command'

def test_workflow_runs_ci_and_publishes_the_site_it_built():
    import yaml
    wf = yaml.safe_load((ROOT / '.github' / 'workflows' / 'ci.yml').read_text())
    steps = wf['jobs']['test']['steps']
    assert any(s.get('run', '').strip() == 'bash .ci/run' for s in steps), 'the workflow must run the CI command'
    upload = [s for s in steps if 'upload-pages-artifact' in s.get('uses', '')]
    assert upload and upload[0]['with']['path'] == 'docs', 'the published site must be the one the tests built'
    assert wf['jobs']['pages']['needs'] == 'test'

def test_readme_links_work_off_the_site():
    "The README is read on the repository and the package index, where a relative `cli.html` has no target."
    readme = (ROOT / 'README.md').read_text()
    relative = re.findall(r'\]\((?!https?://|#)([^)]+\.html[^)]*)\)', readme)
    assert not relative, f"relative page links in README.md: {relative}"
    assert '](https://mmlit.github.io/mmlit/pipeline.html)' in readme
