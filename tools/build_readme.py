"""Generate README.md from nbs/index.ipynb offline (nbdev_readme needs Quarto)."""
import configparser, re
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by tools/build_readme.py: edit the notebook, not this file. -->\n\n"

def docs_url() -> str:
    "The published docs site (settings.ini's doc_host + doc_baseurl), where the README's chapter links point."
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    return cfg['DEFAULT']['doc_host'].rstrip('/') + '/' + cfg['DEFAULT']['doc_baseurl'].strip('/') + '/'

def absolute_links(md: str, base: str) -> str:
    "Relative links to site pages, `[cli](cli.html)`, made absolute: a README is read on the repository and the package index."
    return re.sub(r"\]\((?!https?://|#)([\w./-]+\.html(?:#[\w-]*)?)\)", lambda m: f"]({base}{m.group(1)})", md)

def readme_text(nb_path: Path = ROOT / 'nbs' / 'index.ipynb') -> str:
    "The README's markdown: the notebook's markdown cells and code cells (with text outputs) in order."
    nb = nbformat.read(nb_path, as_version=4)
    parts = []
    for cell in nb.cells:
        src = cell.source.strip()
        if not src or src.startswith('#|'): continue
        if cell.cell_type == 'markdown': parts.append(src)
        elif cell.cell_type == 'code':
            parts.append(f"```python\n{src}\n```")
            for out in cell.get('outputs', []):
                text = out.get('text') or out.get('data', {}).get('text/plain')
                if text: parts.append("```\n" + ''.join(text).rstrip() + "\n```")
    return HEADER + absolute_links('\n\n'.join(parts), docs_url()) + '\n'

if __name__ == '__main__':
    (ROOT / 'README.md').write_text(readme_text(), encoding='utf-8')
