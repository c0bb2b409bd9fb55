"""The built-in text corpus: docstrings of installed Python sources, read offline and reproducibly.

Training the default model reads it (`build_corpus`: the Python standard library of the running
interpreter, PSF License 2.0, plus the installed numpy and torch packages, both BSD-3-Clause; the last
5 % of the stdlib files are held out), and calibrating a quantization reads its beginning
(`calibration_tokens`). Docstrings are extracted with `ast`, files in sorted order.
"""
from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path

import torch

from .tokenizer import default_tokenizer

EXTRA_SOURCES = (("numpy", "BSD-3-Clause"), ("torch", "BSD-3-Clause"))
CHARS_PER_TOKEN = 6  # generous: the text read for n calibration tokens is cut to n after tokenizing


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_docstrings(root: Path, max_chars: int | None = None) -> list[tuple[str, str]]:
    """(relative path, docstrings joined by blank lines) for every parsable stdlib module, in path order."""
    out, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if max_chars is not None and total >= max_chars:
            break
        rel = str(path.relative_to(root))
        if any(part in rel for part in ("site-packages", "test", "idlelib", "lib2to3", "__phello__")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    docs.append(doc.strip())
        if docs:
            out.append((rel, "\n\n".join(docs)))
            total += len(out[-1][1])
    return out


def build_corpus(root: Path | None = None, heldout_fraction: float = 0.05, extra=EXTRA_SOURCES):
    """(training text, held-out text, description for the artifact metadata)."""
    root = root or stdlib_root()
    files = stdlib_docstrings(root)
    n_held = max(1, int(len(files) * heldout_fraction))
    train_parts = [t for _, t in files[:-n_held]]
    held = "\n\n".join(t for _, t in files[-n_held:])
    sources = [{"name": "python-stdlib", "version": sys.version.split()[0], "license": "PSF-2.0",
                "files": len(files)}]
    for name, license_ in extra:
        module = __import__(name)
        more = stdlib_docstrings(Path(module.__file__).parent)
        train_parts += [t for _, t in more]
        sources.append({"name": name, "version": module.__version__, "license": license_, "files": len(more)})
    train = "\n\n".join(train_parts)
    info = {"source": "docstrings of " + ", ".join(s["name"] for s in sources), "sources": sources,
            "license": "PSF-2.0 (stdlib), BSD-3-Clause (numpy, torch)", "python": sys.version.split()[0],
            "files": sum(s["files"] for s in sources), "heldout_files": n_held, "heldout_from": "python-stdlib",
            "sha256": hashlib.sha256((train + "\0" + held).encode()).hexdigest()}
    return train, held, info


def tokenized_corpus():
    """(training ids, held-out ids, description) of `build_corpus`, World-tokenized."""
    tok = default_tokenizer()
    train_text, held_text, corpus = build_corpus()
    return (torch.tensor(tok.encode(train_text), dtype=torch.long),
            torch.tensor(tok.encode(held_text), dtype=torch.long), corpus)


def calibration_tokens(tokenizer, n_tokens: int = 8192) -> list[int]:
    """The first `n_tokens` of the stdlib docstrings: built-in calibration text for quantization."""
    files = stdlib_docstrings(stdlib_root(), max_chars=n_tokens * CHARS_PER_TOKEN)
    return tokenizer.encode("\n\n".join(t for _, t in files))[:n_tokens]
