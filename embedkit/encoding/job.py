"""An encode job's preparation: the manifest, the refusals that compare it with OUT's, the
duplicate-id check, the model and the store; and a shard task's view of a prepared output."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..config import EncodeConfig
from ..engine.encoder import DeviceChoice
from ..engine.models import (
    ModelSource,
    Prompts,
    declared_max_length,
    embedding_dim,
    fast_tokenizer_json,
    load_sentence_transformer,
    model_max_length,
    pooling_mode,
    resolve_model,
    resolve_prompts,
    truncation_side,
    weights_hash,
)
from ..engine.quantize import QUANTIZED, Quantization
from ..engine.tokenize import TextTokenizer
from ..errors import EmbedkitError, EmbedkitNotice
from ..io.corpus import Columns, Corpus, RowOffset, find_first_duplicate, open_corpus
from ..io.shards import (
    MANIFEST,
    Shard,
    appended,
    input_segments,
    manifest_differences,
    read_manifest,
    segment_of,
    settings_differences,
    shards_from_manifest,
    write_manifest,
)
from ..io.store import VectorStore, vectors_schema
from ..version import __version__
from .summary import EncodeSummary

QUANTIZE_SAMPLE_ROWS = 1_000  # documents whose vectors set the int8 ranges (sentence-transformers' advice: about 1k+)
CPU_BATCH_TOKENS = 16_384


def nothing_to_do(out: Path, choice: DeviceChoice, shards: int) -> EncodeSummary:
    return EncodeSummary(out=str(out), device=choice.device, docs=0, tokens=0, padded_tokens=0, seconds=0.0, truncated=0,
                         skipped_empty=0, shards_done=0, shards_skipped=shards, shards_total=shards)  # fmt: skip


def plan_append(out: Path, old: dict | None, store: VectorStore, new: dict, corpus: Corpus) -> tuple[dict, dict]:
    """`encode --append`: (the run's manifest, the input's segment). An input OUT already holds
    is resumed; a new one is numbered after the others, once they are all encoded. Refused: no
    output to add to, other settings, an earlier input not finished. Writes nothing."""
    if old is None or not store.exists():
        raise EmbedkitError(f"--append adds to an existing output and {out} holds none; drop --append to start one")
    diffs = settings_differences(old, new)
    if diffs:
        raise EmbedkitError(f"{out} was written with a different {'; '.join(diffs)}; an appended input must use the same settings")
    same = segment_of(old, new["input"])
    if same is not None:
        return old, same
    store.reconcile()
    done = store.committed_shards()
    for seg in input_segments(old):
        missing = sum(1 for i in range(seg["first_shard"], seg["first_shard"] + seg["shards"]) if i not in done)
        if missing:
            raise EmbedkitError(f"{out} is not fully encoded: {missing} shards of {(seg['input'] or {}).get('path')} to go; rerun the "
                                "encode of that input (unchanged), then append")  # fmt: skip
    manifest = appended(old, new["input"], corpus.num_rows)
    return manifest, manifest["inputs"][-1]


def with_row_offset(corpus: Corpus, segment: dict) -> Corpus:
    """An appended input without an id column continues the output's row numbering."""
    return RowOffset(corpus, segment["first_row"]) if segment["first_row"] and _ids_are_row_numbers(corpus) else corpus


def check_ids_against_stored(corpus: Corpus, store: VectorStore, allow: bool) -> None:
    """An appended input's ids must not repeat among themselves or the ids already stored."""
    import pyarrow.compute as pc

    if not _ids_are_row_numbers(corpus):
        _check_duplicates(corpus, allow)
    if allow:
        return
    ids = corpus.read_ids()
    stored = store.dataset().to_table(columns=["id"]).column("id")
    if ids.type != stored.type:
        raise EmbedkitError(f"this input's ids are {ids.type} and the output's are {stored.type}: an appended input must have ids of the same type")
    clash = pc.filter(ids, pc.is_in(ids, value_set=pc.unique(stored)))
    if len(clash):
        raise EmbedkitError(f"id {clash[0].as_py()!r} is already stored in the output ({len(clash):,} ids of this input are); "
                            "ids must be unique across inputs, or pass --allow-duplicate-ids")  # fmt: skip


def refuse_differences(out: Path, old: dict, manifest: dict) -> None:
    """Refuse a run whose settings differ from those OUT was made with (keys still unknown,
    None until the model is loaded, are left for the second call)."""
    diffs = manifest_differences(old, manifest)
    if old.get("plan") != manifest["plan"]:
        diffs.append(f"shard plan ({old.get('plan')} -> {manifest['plan']})")
    if diffs and not settings_differences(old, manifest) and old["plan"]["shard_rows"] == manifest["plan"]["shard_rows"]:
        raise EmbedkitError(f"{out} was written with a different {diffs[0]}; pass --append to add this input to it, "
                            "or --overwrite to start fresh")  # fmt: skip
    if diffs:
        raise EmbedkitError(f"{out} was written with a different {'; '.join(diffs)}; rerun with --overwrite to start fresh")


def open_input(input: str | Path, cfg: EncodeConfig) -> Corpus:
    """INPUT as the encode reads it: the text and id columns, and the kept ones (nothing else)."""
    return open_corpus(input, Columns(cfg.text_column, cfg.id_column, cfg.keep_columns), follow_symlinks=cfg.follow_symlinks)


def output_schema(corpus: Corpus, cfg: EncodeConfig, dim: int, quantization: Quantization | None = None) -> pa.Schema:
    """The vectors' table; `dim` is the model's, cut to --dim when given."""
    return vectors_schema(corpus.id_type, cfg.dim or dim, cfg.dtype, text=cfg.store_text, kept=corpus.kept_fields,
                          chunked=cfg.chunk_tokens is not None, quantization=quantization)  # fmt: skip


def output_quantization(manifest: dict) -> Quantization | None:
    """The int8 ranges or binary layout an output's vectors were stored with (its manifest's)."""
    recorded = (manifest.get("output") or {}).get("quantization")
    return Quantization.from_json(json.dumps(recorded)) if recorded else None


def calibrate_quantization(corpus: Corpus, st: Any, cfg: EncodeConfig, tokenizer: TextTokenizer) -> Quantization | None:
    """For --dtype int8 or binary: the quantization, from the vectors of a sample of the input
    (QUANTIZE_SAMPLE_ROWS rows in random blocks, encoded here on the CPU before the run: each
    shard's codes must use the same ranges, so they are fixed before the first one)."""
    if cfg.dtype not in QUANTIZED:
        return None
    from ..engine.encoder import Encoder, choose_device
    from ..engine.texts import embed_tokenized
    from ..plan.planning import random_blocks

    texts = [t for a, b in random_blocks(corpus.num_rows, QUANTIZE_SAMPLE_ROWS, seed=0)
             for t in corpus.read(a, b).column("text").to_pylist() if t]  # fmt: skip
    tok = tokenizer(texts)
    encoder = Encoder(st, choose_device("cpu", "auto"), normalize=cfg.normalize, out_dtype="float32",
                      max_batch_tokens=CPU_BATCH_TOKENS, dim=cfg.dim)  # fmt: skip
    vectors = embed_tokenized(encoder, tok, CPU_BATCH_TOKENS)
    if len(vectors) == 0:  # no text at all: nothing will be stored either
        vectors = np.zeros((1, cfg.dim or embedding_dim(st)), np.float32)
    return Quantization.calibrate(cfg.dtype, vectors)


def tokens_per_row(st: Any, cfg: EncodeConfig) -> int:
    """The tokens a row holds at most: the model's length, or the chunk size (which must fit it)."""
    max_length = model_max_length(st, cfg.max_seq_length)
    if cfg.chunk_tokens is None:
        return max_length
    if cfg.chunk_tokens > max_length:
        raise EmbedkitError(f"--chunk-tokens {cfg.chunk_tokens} is above the model's max sequence length {max_length}")
    content = cfg.chunk_tokens - special_tokens(st)
    if content < 1 or cfg.chunk_overlap * 2 >= content:
        raise EmbedkitError(f"--chunk-tokens {cfg.chunk_tokens} leaves {max(content, 0)} tokens of text beside the model's "
                            f"special tokens: too few for --chunk-overlap {cfg.chunk_overlap}")  # fmt: skip
    return cfg.chunk_tokens


def special_tokens(st: Any) -> int:
    """How many special tokens the model's tokenizer wraps each text in."""
    tok = TextTokenizer(fast_tokenizer_json(st), model_max_length(st, None))
    return len(tok.prefix) + len(tok.suffix)


def chosen_prompts(st: Any, source: ModelSource, cfg: EncodeConfig) -> Prompts:
    """The document and query prompts of this run; a notice when the model has prompts and the
    user chose none for documents (retrieval with e5/bge-style models degrades silently
    without them)."""
    prompts, notice = resolve_prompts(st, source, prompt_name=cfg.prompt_name, prompt=cfg.prompt,
                                      query_prompt_name=cfg.query_prompt_name, query_prompt=cfg.query_prompt)  # fmt: skip
    if prompts.document and not getattr(_pooling(st), "include_prompt", True):
        raise EmbedkitError(f"model {source.name} pools without its prompt's tokens (include_prompt false): not supported yet")
    if notice:
        warnings.warn(notice, EmbedkitNotice, stacklevel=2)
    return prompts


def _pooling(st: Any) -> Any:
    return next((m for m in getattr(st, "_modules", {}).values() if type(m).__name__ == "Pooling"), None)


def chunk_overlap(cfg: EncodeConfig) -> int | None:
    """What the tokenizer takes: None (cut long texts) or the overlap of their chunks."""
    return cfg.chunk_overlap if cfg.chunk_tokens is not None else None


def carried_columns(cfg: EncodeConfig) -> list[str]:
    """The columns a window carries from the reader to the store: the id, and what is stored
    beside the vectors (nothing more unless --store-text or --keep-columns)."""
    return ["id", *(["text"] if cfg.store_text else []), *cfg.keep_columns]


@dataclass
class Job:
    """Everything a run needs once the output is validated."""

    out: Path
    choice: DeviceChoice
    model: Any
    manifest: dict
    shards: list[Shard]
    store: VectorStore
    schema: pa.Schema
    max_length: int  # tokens per row: the model's length, or the chunk size
    tokenizer_json: str
    truncation_side: str
    chunk_overlap: int | None = None  # None: texts are cut at max_length; else split into chunks
    prompt: str = ""  # put before every document (every chunk)
    quantization: Quantization | None = None  # --dtype int8 / binary: how floats become codes
    segment: dict | None = None  # the input (of an output holding several) whose shards these are


def prepare_job(corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice, source: ModelSource, manifest: dict,
             old: dict | None, segment: dict | None = None) -> Job:  # fmt: skip
    """Load the model, complete and check the manifest, create or clean the store."""
    # Load on the CPU: the tokenizer workers fork before the model moves to a GPU.
    st = load_sentence_transformer(source, "cpu")
    max_length = model_max_length(st, cfg.max_seq_length)
    row_tokens = tokens_per_row(st, cfg)
    dim = embedding_dim(st)
    if cfg.dim is not None and cfg.dim > dim:
        raise EmbedkitError(f"--dim {cfg.dim} is above the model's dimension {dim}")
    if cfg.dtype == "binary" and (cfg.dim or dim) % 8:
        raise EmbedkitError(f"--dtype binary packs 8 dimensions to a byte: {cfg.dim or dim} is not divisible by 8; choose --dim")
    manifest["model"].update(dim=dim, max_seq_length=max_length, pooling=pooling_mode(st))
    manifest["prompts"] = chosen_prompts(st, source, cfg).to_dict()
    if manifest["model"]["weights_sha256"] is None:  # a hub model loaded from the hub: hashed from its parameters
        manifest["model"]["weights_sha256"] = weights_hash(source, st)
    spec = fast_tokenizer_json(st)
    if old is not None:
        refuse_differences(out, old, manifest)
        quantization = output_quantization(old)
    else:
        if not _ids_are_row_numbers(corpus):
            _check_duplicates(corpus, cfg.allow_duplicate_ids)
        tokenizer = TextTokenizer(spec, row_tokens, truncation_side(st), chunk_overlap(cfg), manifest["prompts"]["document"])
        quantization = calibrate_quantization(corpus, st, cfg, tokenizer)
        if quantization is not None:  # recorded: a resume, and every worker, codes with the same ranges
            manifest["output"]["quantization"] = json.loads(quantization.to_json())
        write_manifest(out, manifest)
    schema = output_schema(corpus, cfg, dim, quantization)
    store = VectorStore(out)
    if not store.exists():  # an existing one was cleaned before the model loaded
        store.create(schema)
    return Job(
        out=out, choice=choice, model=st, manifest=manifest, shards=shards_from_manifest(manifest, segment), store=store,
        schema=schema, max_length=row_tokens, tokenizer_json=spec, truncation_side=truncation_side(st),
        chunk_overlap=chunk_overlap(cfg), prompt=manifest["prompts"]["document"], quantization=quantization, segment=segment,
    )  # fmt: skip


def attach_job(corpus: Corpus, out: Path, cfg: EncodeConfig, choice: DeviceChoice) -> Job:
    """A worker's view of an output that the parent has already prepared (manifest, store)."""
    manifest = read_manifest(out)
    if manifest is None:
        raise EmbedkitError(f"{out} has no {MANIFEST}")
    segment = None
    if len(input_segments(manifest)) > 1:  # appended inputs: this task's is the one with its content
        from ..digest import INPUT_CACHE

        segment = segment_of(manifest, corpus.fingerprint(cache=out / INPUT_CACHE))
        if segment is None:
            raise EmbedkitError(f"{out} holds no input with this content; rerun the encode command")
    st = load_sentence_transformer(resolve_model(cfg.model), "cpu")
    dim = embedding_dim(st)
    return Job(
        out=out, choice=choice, model=st, manifest=manifest, shards=shards_from_manifest(manifest, segment), store=VectorStore(out),
        schema=output_schema(corpus, cfg, dim, output_quantization(manifest)), max_length=tokens_per_row(st, cfg),
        tokenizer_json=fast_tokenizer_json(st), truncation_side=truncation_side(st), chunk_overlap=chunk_overlap(cfg),
        prompt=(manifest.get("prompts") or {}).get("document", ""), quantization=output_quantization(manifest), segment=segment,
    )  # fmt: skip


def build_manifest(corpus: Corpus, cfg: EncodeConfig, source: ModelSource, shard_rows: int, precision: str,
                   cache: Path | None = None) -> dict:  # fmt: skip
    """The manifest as far as it is known without loading the model: `dim` and `pooling` are
    None, and `max_seq_length` too unless given or declared in the model's folder. `precision`:
    the resolved compute precision (DeviceChoice.precision)."""
    max_length = cfg.max_seq_length or declared_max_length(source)
    return {
        "embedkit_version": __version__,
        "model": {"name": source.name, "weights_sha256": weights_hash(source), "dim": None, "max_seq_length": max_length, "pooling": None,
                  "precision": precision},  # fmt: skip
        "output": {"dtype": cfg.dtype, "normalize": cfg.normalize, "keep_empty": cfg.keep_empty, "store_text": cfg.store_text,
                   "keep_columns": list(cfg.keep_columns), "dim": cfg.dim or 0, "chunk_tokens": cfg.chunk_tokens or 0,
                   "chunk_overlap": cfg.chunk_overlap},
        "prompts": _folder_prompts(source, cfg),
        "input": corpus.fingerprint(cache=cache),
        "plan": {"rows": corpus.num_rows, "shard_rows": shard_rows, "shards": -(-corpus.num_rows // shard_rows)},
    }


def _folder_prompts(source: ModelSource, cfg: EncodeConfig) -> dict | None:
    """The prompts as far as they are known before the model loads: from a local folder's
    configuration (so a finished output's rerun with another prompt is refused, not skipped);
    None for a hub model, until it is loaded."""
    if source.path is None:
        return None
    prompts, _ = resolve_prompts(None, source, prompt_name=cfg.prompt_name, prompt=cfg.prompt,
                                 query_prompt_name=cfg.query_prompt_name, query_prompt=cfg.query_prompt)  # fmt: skip
    return prompts.to_dict()


def _ids_are_row_numbers(corpus: Corpus) -> bool:
    """Row numbers cannot repeat: no need to read and check them."""
    return corpus.id_type == pa.int64() and getattr(corpus, "id_col", "") is None


def _check_duplicates(corpus: Corpus, allow: bool) -> None:
    dup = find_first_duplicate(corpus.read_ids())
    if dup is not None and not allow:
        value, rows = dup
        raise EmbedkitError(
            f"duplicate id {value!r} (rows {', '.join(map(str, rows))}); fix the input or pass --allow-duplicate-ids"
        )
