"""embedkit: offline, high-throughput embedding and vector indexing.

Public API (heavy libraries load on first use, so importing embedkit is instant):

    embedkit.encode(input, out, ...)      -> EncodeSummary   corpus -> OUT/vectors.lance
    embedkit.encode_texts(texts, ...)     -> np.ndarray      in-memory embeddings
    embedkit.status(out)                  -> OutputStatus    what an output holds
    embedkit.build_index(out, ...)        -> IndexReport     OUT/vectors.lance -> OUT/index (IVF-PQ)
    embedkit.Retriever(out).search(texts) -> SearchResults   ids, scores (and stored texts), reranked exactly
    embedkit.export(out, path, format=)   -> ExportSummary   an output's rows as jsonl, csv or parquet
    embedkit.generate(input, out, task=)  -> GenerateSummary summarize / score / classify with a causal LM
    embedkit.plan(tokens_per_second=, ...) -> (Plan, count)  GPUs, hours and $ for a job inside a window
"""

from __future__ import annotations

from .version import __version__

__all__ = [
    "encode", "encode_texts", "status", "build_index", "Retriever", "EncodeSummary", "OutputStatus", "IndexReport",
    "SearchResults", "generate", "GenerateSummary", "plan", "export", "ExportSummary", "EmbedkitError", "__version__",
]  # fmt: skip

from .errors import EmbedkitError

# Not lazy like the rest: importing the `embedkit.status` submodule (by anyone, at any time)
# binds `embedkit.status` to that module, unless the function is bound here first. Both modules
# are light.
from .io.export import ExportSummary, export
from .status import OutputStatus, status


def __getattr__(name: str):
    # Lazy: `embedkit --help` and `import embedkit` must not pay for torch or lance.
    if name in ("encode", "EncodeSummary"):
        from .encoding import pipeline

        return getattr(pipeline, name)
    if name == "encode_texts":
        from .engine.texts import encode_texts

        return encode_texts
    if name in ("build_index", "IndexReport"):
        from .index import build

        return getattr(build, name)
    if name in ("generate", "GenerateSummary"):
        # the package is `generation`: a submodule named `generate` would shadow this function
        from .generation import pipeline as generation

        return getattr(generation, name)
    if name == "plan":
        from .plan import planning

        return planning.plan
    if name in ("Retriever", "SearchResults"):
        from .index import search

        return getattr(search, name)
    raise AttributeError(f"module 'embedkit' has no attribute {name!r}")
