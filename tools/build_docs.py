"""Build the docs website offline into docs/ from nbdev's processed notebooks.

nbdev's own `nbdev_docs` renders with Quarto, which cannot be installed everywhere. This script keeps nbdev's
processing (show_doc, doc links, frontmatter, hidden cells: `nbdev.serve.proc_nbs` -> `_proc/`) and renders the
processed notebooks with nbconvert instead, using nbdev's page names (`output-file`) and the order of
`nbs/sidebar.yml`, so links between API pages resolve exactly as on a Quarto-built site.
Usage: python tools/build_docs.py [OUT_DIR]
"""
from __future__ import annotations
import html, os, re, sys
from pathlib import Path
import nbformat, yaml

ROOT = Path(__file__).resolve().parent.parent

def _frontmatter(nb) -> dict:
    "Title, description and output-file from the raw YAML cell nbdev puts first."
    for cell in nb.cells:
        if cell.cell_type == 'raw' and cell.source.lstrip().startswith('---'):
            meta = yaml.safe_load(cell.source.strip().strip('-')) or {}
            nb.cells.remove(cell)
            return meta
    return {}

def _directives(src: str) -> dict:
    return dict((m.group(1), m.group(2).strip()) for m in re.finditer(r'^#\|\s*([\w-]+)\s*:\s*(.*)$', src, flags=re.M))

def _prepare(nb) -> None:
    "Hide inputs nbdev marks `echo: false`, drop `#|` directive lines from shown code."
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        d = _directives(cell.source)
        tags = set(cell.metadata.get('tags', []))
        if d.get('echo') == 'false': tags.add('remove_input')
        if d.get('output') == 'false': tags.add('remove_output')
        if d.get('include') == 'false': tags.add('remove_cell')
        cell.metadata['tags'] = sorted(tags)
        cell.source = '\n'.join(l for l in cell.source.split('\n') if not l.startswith('#|')).strip('\n')

# Maths: LaTeX between $…$ / $$…$$ becomes MathML when the site is built, so formulas render with no script and no
# network (the notebook template would load MathJax from a CDN). Code spans and fenced blocks are left alone.
_CODE = re.compile(r'(```.*?```|`[^`\n]*`)', flags=re.S)
_MATH = re.compile(r'\$\$(.+?)\$\$|(?<![\\$])\$([^$\n]+?)\$(?!\$)', flags=re.S)

def render_math(text: str) -> str:
    "Markdown with its $…$ (inline) and $$…$$ (display) LaTeX replaced by MathML elements."
    from latex2mathml.converter import convert
    def one(m):
        tex, block = (m.group(1), True) if m.group(1) is not None else (m.group(2), False)
        html_ = convert(tex.strip(), display='block' if block else 'inline').replace('\n', '')
        return f'\n\n{html_}\n\n' if block else html_
    return ''.join(part if i % 2 else _MATH.sub(one, part) for i, part in enumerate(_CODE.split(text)))

def _maths(nb) -> None:
    "Render the maths of markdown cells and of markdown outputs (`display(Markdown(...))`)."
    for cell in nb.cells:
        if cell.cell_type == 'markdown': cell.source = render_math(cell.source)
        for o in cell.get('outputs', []):
            md = o.get('data', {}).get('text/markdown')
            if md is not None: o['data']['text/markdown'] = render_math(''.join(md) if isinstance(md, list) else md)

def _page_name(nb_path: Path, meta: dict) -> str:
    return meta.get('output-file') or re.sub(r'^\d+[a-z]?_', '', nb_path.stem) + '.html'

def _sidebar(nbs: Path) -> list[str]:
    side = yaml.safe_load((nbs / 'sidebar.yml').read_text())
    return [c for c in side['website']['sidebar']['contents'] if isinstance(c, str)]

CSS = """
body{margin:0} .mmlit-nav{position:fixed;top:0;left:0;bottom:0;width:230px;overflow:auto;background:#f6f7f9;
border-right:1px solid #ddd;padding:1rem;font-family:system-ui,sans-serif;box-sizing:border-box}
.mmlit-nav a{display:block;padding:.25rem .4rem;color:#1a4f8b;text-decoration:none;border-radius:4px}
.mmlit-nav a.active{background:#dbe7f5;font-weight:600} .mmlit-nav .site{font-size:1.3rem;font-weight:700;margin-bottom:1rem}
.mmlit-main{margin-left:250px;max-width:1100px;padding:1rem 2rem} .mmlit-main h1.title{margin-bottom:.2rem}
.mmlit-main p.description{font-style:italic;opacity:.75;font-size:1.15rem}
.mmlit-main table{border-collapse:collapse} .mmlit-main td,.mmlit-main th{border:1px solid #ddd;padding:.2rem .5rem}
.jp-RenderedImage img{max-width:100%}
.mmlit-main pre{overflow-x:auto;white-space:pre} .mmlit-main .jp-Cell,.mmlit-main .jp-InputArea-editor{min-width:0}
.mmlit-main math[display=block]{margin:.8rem 0;font-size:1.1em}
"""

def _inline_code(text: str) -> str:
    "Escaped text with its `code` spans as <code> elements (page subtitles are written in markdown)."
    return re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(text))

def _nav(pages: list[tuple[str, str]], current: str) -> str:
    items = ''.join(f'<a href="{href}"{" class=active" if href == current else ""}>{html.escape(title)}</a>'
                    for href, title in pages)
    return f'<nav class="mmlit-nav"><div class="site"><a href="index.html">mmlit</a></div>{items}</nav>'

def build(out: Path = ROOT / 'docs', force: bool = True) -> list[Path]:
    "Process the notebooks with nbdev, render them to HTML in `out`; returns the pages written."
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from nbdev.config import get_config
    import nbdev.doclinks
    from nbdev.serve import proc_nbs
    os.chdir(ROOT)
    cfg = get_config()
    nbdev.doclinks._build_modidx()
    proc_nbs(force=force, n_workers=0)   # nbdev's processing only: no Quarto involved
    proc, nbs = ROOT / '_proc', ROOT / cfg.nbs_path
    site_url = (cfg.doc_host.rstrip('/') + '/' + cfg.doc_baseurl.strip('/') + '/').replace('//mmlit/', '/mmlit/')
    books = []
    for name in _sidebar(nbs):
        nb = nbformat.read(proc / name, as_version=4)
        meta = _frontmatter(nb)
        _prepare(nb)
        _maths(nb)
        books.append((Path(name), nb, meta))
    pages = [(_page_name(p, m), m.get('title', p.stem)) for p, _, m in books]
    exporter = HTMLExporter(template_name='lab', exclude_input_prompt=True, exclude_output_prompt=True)
    trp = TagRemovePreprocessor(remove_input_tags={'remove_input'}, remove_all_outputs_tags={'remove_output'},
                                remove_cell_tags={'remove_cell'}, enabled=True)
    exporter.register_preprocessor(trp, enabled=True)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (path, nb, meta), (href, title) in zip(books, pages):
        body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': title}})
        body = re.sub(r'<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->', '', body, flags=re.S)   # no CDN
        body = re.sub(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', '', body)   # the site works offline
        body = body.replace(site_url, '')   # nbdev's absolute doc links -> relative links within this site
        # Pandoc attributes nbdev writes after its source links: turn them into real attributes
        body = re.sub(r'<a href="([^"]+)"[^>]*>source</a>\{target="_blank" style="([^"]*)"\}',
                      r'<a href="\1" target="_blank" style="\2">source</a>', body)
        # Quarto lower-cases heading ids and nbdev's links expect that (`tiling.html#tileplan`); nbconvert keeps the case
        body = re.sub(r'(<h[1-6][^>]*\bid=")([^"]+)"', lambda m: m.group(1) + m.group(2).lower() + '"', body)
        body = re.sub(r'href="#([^"]+)"', lambda m: 'href="#' + m.group(1).lower() + '"', body)
        head = f'<h1 class="title">{html.escape(title)}</h1>' + (
            f'<p class="description">{_inline_code(meta["description"])}</p>' if meta.get('description') else '')
        body = body.replace('</head>', f'<style>{CSS}</style></head>', 1)
        body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + _nav(pages, href) + '<div class="mmlit-main">' + head, body, 1)
        body = body.replace('</body>', '</div></body>', 1)
        (out / href).write_text(body, encoding='utf-8')
        written.append(out / href)
    return written

if __name__ == '__main__':
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'docs'
    for p in build(out): print(p)
