"""Fail when nbdev_export, nbdev_clean or the README builder would change anything: notebooks and package must agree."""
import hashlib, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

def snapshot() -> dict:
    "Hash of every file the generators may touch."
    files = [p for d in ('mmlit', 'nbs') for p in (ROOT / d).rglob('*') if p.is_file() and '__pycache__' not in p.parts
             and '.ipynb_checkpoints' not in p.parts]
    files += [ROOT / 'README.md']
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in files}

def main() -> int:
    before = snapshot()
    for cmd in ([str(BIN / 'nbdev_export')], [str(BIN / 'nbdev_clean')], [sys.executable, str(ROOT / 'tools' / 'build_readme.py')]):
        subprocess.run(cmd, cwd=ROOT, check=True)
    after = snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        print("Out of sync: these files changed when regenerated from the notebooks:\n  " + '\n  '.join(changed))
        print("Run `make export` and commit the notebooks together with the exported package and README.")
        return 1
    print(f"notebooks, package and README agree ({len(after)} files checked)")
    return 0

if __name__ == '__main__': sys.exit(main())
