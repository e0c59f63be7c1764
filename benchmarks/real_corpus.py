"""A corpus of many distinct real texts, available offline on any machine with Python.

For index benchmarks on real embeddings rather than synthetic vectors: the non-trivial lines,
comments and docstring lines of the Python sources installed on the machine (the standard
library and site-packages, with their .pyi, .rst, .md and .txt files), plus pydocs split into sentences, headings and list items
(`bench_first_run.short_texts`), which fills up to the size asked for with word windows of
4-14 words once its sentences run out. Texts are de-duplicated (exact, after whitespace is
collapsed); a seeded random share is held out (never written to the corpus) to serve as queries
that the index has not seen.

    python benchmarks/real_corpus.py --pydocs pydocs.parquet --n 10000000 --out real.parquet
"""

from __future__ import annotations

import argparse
import hashlib
import re
import site
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

MIN_CHARS = 24  # shorter lines are mostly syntax (`return x`, `else:`)
MAX_CHARS = 400
WORD = re.compile(r"[A-Za-z]{3,}")


def source_roots() -> list[Path]:
    roots = {Path(sysconfig.get_paths()["stdlib"]), *map(Path, site.getsitepackages())}
    return sorted(r for r in roots if r.is_dir())


SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")  # sources, stubs, and the packages' own docs


def source_texts(roots: list[Path]) -> Iterator[str]:
    """Lines of source and documentation files with at least three words of letters, comment
    markers and quotes removed."""
    for root in roots:
        for path in sorted(p for p in root.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
            try:
                lines = path.read_text(encoding="utf-8", errors="ignore").splitlines()
            except OSError:
                continue
            for line in lines:
                text = " ".join(line.strip().lstrip("#").strip().strip("\"'").split())
                if MIN_CHARS <= len(text) <= MAX_CHARS and len(WORD.findall(text)) >= 3:
                    yield text


def build(pydocs: Path | None, n: int, held_out: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(corpus texts, held-out texts): up to n + held_out distinct texts, split at random."""
    seen: set[bytes] = set()
    texts: list[str] = []

    def take(stream) -> None:
        for t in stream:
            key = hashlib.blake2b(t.encode(), digest_size=12).digest()
            if key not in seen:
                seen.add(key)
                texts.append(t)
                if len(texts) >= n + held_out:
                    return

    take(source_texts(source_roots()))
    sources = len(texts)
    if pydocs is not None and len(texts) < n + held_out:
        import pyarrow.parquet as pq

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_first_run import short_texts

        docs = pq.read_table(pydocs, columns=["text"]).column("text").to_pylist()
        # sentences, headings and list items first, then word windows to fill up (some
        # collide with source lines: ask for a little more)
        take(short_texts(docs, int(1.05 * (n + held_out - len(texts)))))
    print(f"{sources:,} texts from Python sources and docs, {len(texts) - sources:,} from pydocs", flush=True)
    order = np.random.default_rng(seed).permutation(len(texts))
    hold = set(order[:held_out].tolist())
    return [t for i, t in enumerate(texts) if i not in hold], [texts[i] for i in order[:held_out]]


def write(texts: list[str], path: Path, ids: bool = True) -> None:
    """A parquet corpus; without `ids` the rows' ids are their row numbers (= index positions)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"id": pa.array([f"r{i}" for i in range(len(texts))])} if ids else {}
    pq.write_table(pa.table({**columns, "text": pa.array(texts)}), path, row_group_size=65_536)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pydocs", default=None)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--held-out", type=int, default=2000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    corpus, held = build(Path(args.pydocs) if args.pydocs else None, args.n, args.held_out)
    write(corpus, Path(args.out))
    Path(args.out).with_suffix(".held-out.txt").write_text("\n".join(held) + "\n")
    print(f"{len(corpus):,} texts -> {args.out}; {len(held):,} held out; from {', '.join(map(str, source_roots()))}")


if __name__ == "__main__":
    main()
