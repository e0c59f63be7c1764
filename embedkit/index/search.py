"""Search: IVF-PQ candidates from the memory-mapped index, reranked exactly with the stored vectors.

The index returns `rerank` candidates per query by approximate (PQ) distance; their vectors
are read from vectors.lance (the version the index was built on) and scored exactly by inner
product, which on normalized vectors is the cosine. The same code measures recall while
tuning, so the recall in params.json is the recall of this search.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import EmbedkitError
from ..io.objstore import out_path
from ..io.shards import read_manifest
from ..io.store import VECTORS_DIR, chunk_columns, stored_columns
from .io import load_index, read_rows
from .remote import fetch
from .state import INDEX_DIR, PARAMS, index_damage, params_problem, read_json, staleness

NPROBE_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072, 262144)
RERANK_FACTORS = (1, 2, 5, 10)  # rerank depth = factor * k
TABLE_CEILING = 0.99  # the tuning table is measured up to this recall (or the grid's end)
# ... or until doubling nprobe gains less than this at the deepest rerank: past the plateau PQ's
# codes (not the lists probed) bound the recall, and the scans double in cost (at IVF4096 on 1M
# vectors the last two settings were 75% of a 20 s tuning and gained nothing)
TABLE_PLATEAU = 0.0025
# Chunked outputs: rows ranked per query to find k distinct documents (a document's chunks
# often rank next to each other, so k rows would give fewer than k documents).
CHUNK_DEPTH = 5


@dataclass(frozen=True)
class SearchResults:
    """Per query, the ids and scores of its hits, best first (fewer than k when the index is smaller).

    `texts` (when the output stores them: `encode --store-text`) and `columns` (the kept input
    columns, by name) are per query too, in the order of `ids`.
    """

    ids: list[list[Any]]
    scores: list[list[float]]
    texts: list[list[str | None]] | None = None
    columns: dict[str, list[list[Any]]] = field(default_factory=dict)

    def to_json(self, queries: Sequence[str] | None = None) -> list[dict]:
        """One dict per query: {"query"?, "hits": [{"id", "score", "text"?, ...columns}]}."""
        rows = []
        for i, (ids, scores) in enumerate(zip(self.ids, self.scores)):
            row: dict = {"query": queries[i]} if queries is not None else {}
            row["hits"] = [self._hit(i, j, d, s) for j, (d, s) in enumerate(zip(ids, scores))]
            rows.append(row)
        return rows

    def _hit(self, query: int, rank: int, doc_id: Any, score: float) -> dict:
        hit = {"id": doc_id, "score": round(float(score), 6)}
        if self.texts is not None:
            hit["text"] = self.texts[query][rank]
        for name, values in self.columns.items():
            hit[name] = values[query][rank]
        return hit

    def lines(self, queries: Sequence[str], width: int = 100) -> list[str]:
        """What `embedkit search` prints: per query its line, then rank, score, id and, when
        stored, the text; each on one line, shortened to `width` characters in all.

        >>> SearchResults([["a"]], [[0.5]], [["Open  a\\nfile."]]).lines(["q"])
        ['query: q', '   1. 0.5000  a  Open a file.']
        """
        out = []
        for i, query in enumerate(queries):
            out.append(f"query: {one_line(query, max(20, width - 7))}")
            for rank, (doc_id, score) in enumerate(zip(self.ids[i], self.scores[i])):
                line = f"  {rank + 1:2d}. {score:.4f}  {doc_id}"
                if "chunk" in self.columns:  # which chunk of the document, and where it lies
                    c = self.columns
                    line += f" #{c['chunk'][i][rank]} [{c['start'][i][rank]}:{c['end'][i][rank]}]"
                if self.texts is not None and self.texts[i][rank] is not None:
                    line += "  " + one_line(self.texts[i][rank], max(20, width - len(line) - 2))
                out.append(line)
        return out


def one_line(text: str, width: int) -> str:
    """Whitespace collapsed, cut to `width` characters with an ellipsis.

    >>> one_line("a  b\\n\\tc " * 3, 10)
    'a b c a b…'
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class VectorCache:
    """Exact vectors of row positions, read from Lance once each."""

    def __init__(self, ds: Any, dim: int):
        self.ds = ds
        self.pos = np.zeros(0, np.int64)
        self.vec = np.zeros((0, dim), np.float32)

    def get(self, positions: np.ndarray) -> np.ndarray:

        want = np.unique(positions)
        new = np.setdiff1d(want, self.pos, assume_unique=True)
        if len(new):
            pos = np.concatenate([self.pos, new])
            vec = np.concatenate([self.vec, read_rows(self.ds, new)])
            order = np.argsort(pos)
            self.pos, self.vec = pos[order], vec[order]
        return self.vec[np.searchsorted(self.pos, positions)]


def candidates(index: Any, q: np.ndarray, nprobe: int, depth: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(nq, depth) positions from the index by approximate distance; -1 pads. `exclude[i]` (a
    position) is removed from query i's list: tuning queries are rows of the index."""
    import faiss

    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe
    extra = 1 if exclude is not None else 0
    depth_asked = min(depth + extra, index.ntotal)
    _, found = index.search(np.ascontiguousarray(q, dtype=np.float32), depth_asked)
    if exclude is not None:
        # move each query's own position to the end of its row, keeping the order of the rest
        order = np.argsort(found == exclude[:, None], axis=1, kind="stable")
        found = np.take_along_axis(found, order, 1)[:, :depth]
    if found.shape[1] < depth:
        found = np.pad(found, ((0, 0), (0, depth - found.shape[1])), constant_values=-1)
    return found[:, :depth]


def rerank(q: np.ndarray, cand: np.ndarray, cache: VectorCache, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidates; the best k (positions, scores)."""
    valid = cand >= 0
    vec = cache.get(np.where(valid, cand, cand[valid].min() if valid.any() else 0).ravel()).reshape(*cand.shape, -1)
    scores = np.einsum("qd,qrd->qr", q.astype(np.float32), vec)
    scores[~valid] = -np.inf
    k = min(k, cand.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, 1), np.take_along_axis(scores, order, 1)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth|."""
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits)) if hits else 0.0


def tune(index: Any, ds: Any, q: np.ndarray, qpos: np.ndarray, truth: np.ndarray, k: int, target: float, nlist: int):
    """Smallest nprobe, then smallest rerank depth, whose recall@k reaches `target`.

    Returns (table, nprobe, rerank, recall); when nothing reaches the target, the best seen.
    The table goes on past the target, up to TABLE_CEILING, so that a search can later ask
    for a higher recall (`Retriever(recall=R)`) from what was measured.
    """
    cache = VectorCache(ds, q.shape[1])
    probes = [p for p in NPROBE_GRID if p < nlist] + [nlist] if nlist else [0]
    depths = [f * k for f in RERANK_FACTORS]
    table, best, chosen, deepest = [], None, None, None
    for nprobe in probes:
        cand = candidates(index, q, nprobe, depths[-1], exclude=qpos)
        for depth in depths:
            found, _ = rerank(q, cand[:, :depth], cache, k)
            r = recall_at(found, truth)
            table.append({"nprobe": nprobe, "rerank": depth, "recall": round(r, 4)})
            if best is None or r > best[2] + 1e-12:
                best = (nprobe, depth, r)
            if chosen is None and r >= target:
                chosen = (nprobe, depth, r)
            if r >= max(target, TABLE_CEILING):
                return (table, *chosen)
        if chosen is not None and deepest is not None and r - deepest < TABLE_PLATEAU:
            break  # past the target, and more lists no longer help
        deepest = r
    return (table, *(chosen or best))


def recall_of(index: Any, ds: Any, q: np.ndarray, qpos: np.ndarray, truth: np.ndarray, k: int, nprobe: int, depth: int) -> float:
    """recall@k of the search at one setting (the build's second figure: stored rows)."""
    found, _ = rerank(q, candidates(index, q, nprobe, depth, exclude=qpos), VectorCache(ds, q.shape[1]), k)
    return recall_at(found, truth)


def setting_for(table: list[dict], recall: float) -> tuple[int, int, float]:
    """From a build's tuning table: the first (nprobe, rerank) measured to reach `recall`, in the
    order tuned (fewest lists first); the best measured when none does."""
    if not table:
        raise EmbedkitError("the index has no tuning table; rebuild it with `embedkit build-index --overwrite`")
    row = next((r for r in table if r["recall"] >= recall), max(table, key=lambda r: r["recall"]))
    return int(row["nprobe"]), int(row["rerank"]), float(row["recall"])


class Retriever:
    """Search an embedkit output: `Retriever(out).search(["query"], k=10)`.

    Opens OUT/index (memory-mapped), checks it was built for the current vectors and that its
    files are intact, and reranks candidates exactly with the stored vectors.

    >>> r = embedkit.Retriever("out/")                  # doctest: +SKIP
    >>> r.search(["how do I open a file"], k=5).ids     # doctest: +SKIP
    """

    def __init__(self, out: str | Path, *, nprobe: int | None = None, rerank: int | None = None, recall: float | None = None,
                 verify: str = "quick"):  # fmt: skip
        self.out = out_path(out)  # a local Path, or an s3:// ObjectPath
        folder = self.out / INDEX_DIR
        if not self.out.is_dir():
            raise EmbedkitError(f"output not found: {self.out}")
        for name, value in (("nprobe", nprobe), ("rerank", rerank)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EmbedkitError(f"--{name} must be a positive number, not {value!r}")
        if recall is not None and not (isinstance(recall, (int, float)) and 0 < recall <= 1):
            raise EmbedkitError(f"--recall must be in (0, 1], not {recall!r}")
        self.params = read_json(folder / PARAMS)
        if self.params is None:
            raise EmbedkitError(f"{self.out} has no finished index; run `embedkit build-index {self.out}`")
        problem = params_problem(self.params)
        if problem:
            raise EmbedkitError(f"{folder / PARAMS} is damaged ({problem}); rebuild with `embedkit build-index {self.out} --overwrite`")
        self.manifest = read_manifest(self.out) or {}
        try:
            self.ds = self._vectors()
            local = fetch(self.out)  # OUT/index, or a local copy of an index on object storage
            _verify(local, self.params, verify, self.out)
            self.index = load_index(local)
            self.nprobe, self.rerank = int(self.params["nprobe"]), int(self.params["rerank"])
            if recall is not None:  # the setting the build measured to reach it
                self.nprobe, self.rerank, _ = setting_for(self.params.get("report", {}).get("recall_table", []), recall)
            self.nprobe, self.rerank = nprobe or self.nprobe, rerank or self.rerank
            self.cache = VectorCache(self.ds, int(self.params["key"]["dim"]))
        except (KeyError, TypeError, ValueError) as e:  # a params.json edited by hand, or from elsewhere
            raise EmbedkitError(f"{folder / PARAMS} is damaged ({type(e).__name__}: {e}); rebuild with "
                                f"`embedkit build-index {self.out} --overwrite`") from None  # fmt: skip
        self._model_checked = False

    def _vectors(self) -> Any:
        """The vectors the index was built on: the latest version, unchanged since, its data files whole."""
        import lance

        from ..io.store import VectorStore

        uri = str(self.out / VECTORS_DIR)
        try:
            latest = lance.dataset(uri)
        except Exception:
            raise EmbedkitError(f"cannot open {uri}; the index needs the vectors it was built from") from None
        stale = staleness(self.params, latest)
        if stale is not None:
            raise EmbedkitError(f"the index was {stale}; run `embedkit build-index {self.out}` again")
        damaged = VectorStore(self.out).damaged_files(latest)
        if damaged:
            raise EmbedkitError(f"{uri} has a damaged data file ({damaged[0]}); rerun the encode command to redo its shard, "
                                f"then `embedkit build-index {self.out}`")  # fmt: skip
        return latest

    def _output_changed(self) -> bool:
        """Whether the vectors are no longer the version this Retriever opened."""
        import lance

        try:
            return staleness(self.params, lance.dataset(str(self.out / VECTORS_DIR))) is not None
        except Exception:  # gone, or half rewritten
            return True

    def _check_model(self, name: str) -> None:
        """The model that encodes the queries is the one the documents were encoded with (a local
        folder whose weights changed since would put queries in another space, silently)."""
        from ..engine.models import resolve_model, weights_hash

        if self._model_checked:
            return
        source = resolve_model(name)
        pinned = self.manifest.get("model", {}).get("weights_sha256")
        now = weights_hash(source) if source.path is not None else None
        if pinned and now and now != pinned:
            raise EmbedkitError(f"the weights of model {name} changed since {self.out} was encoded; queries would be encoded by "
                                "another model: restore the model, or encode again with --overwrite")  # fmt: skip
        self._model_checked = True

    def search(self, texts: Sequence[str], k: int = 10, chunks: bool = False) -> SearchResults:
        """Encode the texts with the output's model (and its query prompt), then search_vectors."""
        from ..engine.texts import text_list
        from .queries import encode_queries

        texts = text_list(texts, "queries")
        model = self.manifest.get("model", {}).get("name")
        if model is None:
            raise EmbedkitError(f"{self.out}/embedkit.json names no model; search with vectors instead")
        self._check_model(model)
        # queries cut as the documents were, after the query prompt the encode recorded
        return self.search_vectors(encode_queries(list(texts), self.manifest), k, chunks)

    def search_vectors(self, vectors: np.ndarray, k: int = 10, chunks: bool = False) -> SearchResults:
        """The k nearest stored rows of each vector: ids (the input's ids) and exact scores.

        An output encoded with --chunk-tokens holds one row per chunk: each hit is then a
        document, scored by its best chunk, with that chunk's `chunk`, `start` and `end` (and
        its text, when stored); `chunks=True` returns the k best chunk rows instead.
        """
        q = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if q.shape[1] != self.index.d:
            raise EmbedkitError(f"query vectors have dimension {q.shape[1]}, the index {self.index.d}")
        if k < 1:
            raise EmbedkitError(f"k must be positive, not {k}")
        nprobe = self.nprobe if self.params["key"].get("factory", "").find("IVF") >= 0 else 0
        per_document = bool(chunk_columns(self.ds.schema)) and not chunks
        depth = k * CHUNK_DEPTH if per_document else k
        cand = candidates(self.index, q, nprobe, max(self.rerank, depth))
        try:
            positions, scores = rerank(q, cand, self.cache, depth)
            found = self._rows(positions)
        except Exception:
            # the vectors version this Retriever reads may have been deleted under it (an
            # `encode --overwrite`, a version cleanup): say so rather than show Lance's error
            if self._output_changed():
                raise EmbedkitError(f"{self.out} changed while searching (its vectors were rewritten); search again, "
                                    f"after `embedkit build-index {self.out}` if it asks for it") from None  # fmt: skip
            raise
        scored = [s[p >= 0].tolist() for p, s in zip(positions, scores)]
        if per_document:
            found, scored = _best_per_document(found, scored, k)
        if "chunk" in found and "text" in found:  # a chunk's hit shows the chunk, not its whole document
            found["text"] = [[t if t is None else t[a:b] for t, a, b in zip(*row)] for row in zip(found["text"], found["start"], found["end"])]
        return SearchResults(ids=found.pop("id"), scores=scored, texts=found.pop("text", None), columns=found)

    def _rows(self, positions: np.ndarray) -> dict[str, list[list[Any]]]:
        """The hits' ids and stored columns (text, kept columns), per query: one `take` for all."""
        names = ["id", *chunk_columns(self.ds.schema), *stored_columns(self.ds.schema)]
        flat = positions[positions >= 0]
        if len(flat) == 0:
            return {name: [[] for _ in positions] for name in names}
        uniq = np.unique(flat)
        table = self.ds.take(uniq, columns=names)
        where = {p: i for i, p in enumerate(uniq.tolist())}
        rows = [[where[p] for p in row[row >= 0].tolist()] for row in positions]
        return {name: _per_query(table.column(name).to_pylist(), rows) for name in names}


def _per_query(values: list, rows: list[list[int]]) -> list[list]:
    return [[values[i] for i in row] for row in rows]


def _best_per_document(found: dict[str, list[list[Any]]], scores: list[list[float]], k: int) -> tuple[dict, list[list[float]]]:
    """Per query, each document's first (best-scored) row only, at most k of them."""
    keep = []
    for ids in found["id"]:
        seen: set = set()
        rows = [i for i, d in enumerate(ids) if not (d in seen or seen.add(d))][:k]
        keep.append(rows)
    picked = {name: [[row[i] for i in rows] for row, rows in zip(values, keep)] for name, values in found.items()}
    return picked, [[row[i] for i in rows] for row, rows in zip(scores, keep)]


def _verify(folder: Path, params: dict, level: str, out: Any) -> None:
    """Sizes always; the sha256 of merged.index ("quick") or of every file ("full")."""
    if level == "none":
        return
    damage = index_damage(folder, params, full=level == "full")
    if damage is not None:
        raise EmbedkitError(f"{damage}; rebuild with `embedkit build-index {out}`")


