"""A deterministic generated git repository of N files (default 5,000), about 10 MB."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

GIT_ENV = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}

# The file the scripted agent edits (it exists in every generated repository).
TARGET = "src/pkg000/mod0000.py"
TARGET_LINE = "def f0000_0(x):\n    return x + 0\n"

_WORDS = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "widget",
    "gadget",
    "parser",
    "buffer",
    "cache",
    "index",
    "store",
)


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def _module(rng: random.Random, index: int) -> str:
    lines = [f'"""Module {index}: {" ".join(rng.choices(_WORDS, k=8))}."""', ""]
    for j in range(rng.randint(4, 12)):
        lines.append(f"def f{index:04d}_{j}(x):")
        if rng.random() < 0.5:
            lines.append(f"    # {' '.join(rng.choices(_WORDS, k=rng.randint(4, 12)))}")
        lines.append(f"    return x + {j}")
        lines.append("")
    return "\n".join(lines) + "\n"


def generate(dest: Path, files: int = 5000, seed: int = 1, loose: bool = False) -> Path:
    """Write ``files`` files under ``dest`` (a README and src/pkgNNN/modNNNN.py, 50 per
    package, ~0.6 kB each) and commit them on ``main``. The objects are packed (``git gc``),
    as in a repository cloned from a server, unless ``loose``: then every blob stays a loose
    object file, which ``git clone --mirror`` of a local path keeps as it is."""
    rng = random.Random(seed)
    dest.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=dest)
    (dest / "README.md").write_text("# generated benchmark repository\n")
    written = 1
    index = 0
    while written < files:
        path = dest / "src" / f"pkg{index // 50:03d}" / f"mod{index:04d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = _module(rng, index)
        if index == 0:
            text = f'"""Module 0."""\n\n{TARGET_LINE}'
        path.write_text(text)
        written += 1
        index += 1
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", f"generated repository with {files} files", cwd=dest)
    if not loose:
        git("gc", "-q", "--prune=now", cwd=dest)
    return dest


def describe(repo: Path) -> str:
    """``5000 files, 3.0 MB, objects packed`` (sizes of the checked-out files)."""
    names = git("ls-files", cwd=repo).splitlines()
    size = sum((repo / n).stat().st_size for n in names)
    packs = "loose objects" if not list((repo / ".git/objects/pack").glob("*.pack")) else "packed"
    return f"{len(names)} files, {size / 1e6:.1f} MB, objects {packs}"
