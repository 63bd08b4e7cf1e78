"""Generate README.md from nbs/index.ipynb offline (nbdev_readme needs Quarto)."""
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by tools/build_readme.py: edit the notebook, not this file. -->\n\n"

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
    return HEADER + '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    (ROOT / 'README.md').write_text(readme_text(), encoding='utf-8')
