"""Models beyond the default BERT: sentence-transformers folders of other shapes, built here with
random weights and a tokenizer trained on the sample (nothing downloaded), encode to the
vectors `SentenceTransformer.encode` gives, with the tokenizer's own special tokens and length.

- XLM-RoBERTa (SentencePiece-style Unigram tokenizer, <s> ... </s>), mean pooling;
- ModernBERT (no token types, its own [CLS] ... [SEP]), CLS pooling;
- a Qwen3 decoder with last-token pooling and an end-of-text token appended (Qwen3-Embedding style).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lance
import numpy as np
import pytest
from conftest import parquet_input

import embedkit
from embedkit.errors import EmbedkitNotice

torch = pytest.importorskip("torch")

ROWS = 80


def _train_tokenizer(texts: list[str], kind: str, specials: list[str]):
    """A small real tokenizer for `kind` ("unigram" like XLM-R's, "wordpiece", "bpe"), trained on the texts."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token=specials[3])
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def _save(folder: Path, hf_model, fast_tokenizer, pooling: str, max_len: int) -> Path:
    from sentence_transformers import SentenceTransformer, models

    hf_dir = folder / "hf"
    hf_model.save_pretrained(hf_dir)
    fast_tokenizer.save_pretrained(hf_dir)
    transformer = models.Transformer(str(hf_dir), max_seq_length=max_len)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pool = models.Pooling(dim(), pooling_mode=pooling)
    st = SentenceTransformer(modules=[transformer, pool], device="cpu")
    st.save(str(folder / "st"))
    return folder / "st"


def xlm_roberta(root: Path, texts: list[str]) -> Path:
    from tokenizers import processors
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = _train_tokenizer(texts, "unigram", specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")]
    )
    fast = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                   unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=96)  # fmt: skip
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=100, pad_token_id=1)  # fmt: skip
    return _save(root / "xlmr", XLMRobertaModel(config).eval(), fast, "mean", 96)


def modern_bert(root: Path, texts: list[str]) -> Path:
    from tokenizers import processors
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = _train_tokenizer(texts, "wordpiece", specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                   mask_token="[MASK]", model_max_length=64, model_input_names=["input_ids", "attention_mask"])  # fmt: skip
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=tok.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=128, pad_token_id=tok.token_to_id("[PAD]"),
                              cls_token_id=tok.token_to_id("[CLS]"), sep_token_id=tok.token_to_id("[SEP]"),
                              global_attn_every_n_layers=2, local_attention=32)  # fmt: skip
    config._attn_implementation = "sdpa"
    return _save(root / "modernbert", ModernBertModel(config).eval(), fast, "cls", 64)


def qwen3_last_token(root: Path, texts: list[str]) -> Path:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    specials = ["<|endoftext|>"]
    tok = _train_tokenizer(texts, "bpe", specials)
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=80,
                                   model_input_names=["input_ids", "attention_mask"])  # fmt: skip
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=12, intermediate_size=96, max_position_embeddings=128,
                         pad_token_id=eot, eos_token_id=eot)  # fmt: skip
    config._attn_implementation = "sdpa"
    return _save(root / "qwen3", Qwen3Model(config).eval(), fast, "lasttoken", 80)


BUILDERS = {"xlm-roberta": xlm_roberta, "modernbert": modern_bert, "qwen3-last-token": qwen3_last_token}


@pytest.fixture(scope="module")
def texts(sample) -> list[str]:
    return sample.column("text").to_pylist()[:ROWS]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory, sample) -> str:
    return parquet_input(tmp_path_factory, sample.slice(0, ROWS), "other-models-input")


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_vectors_equal_sentence_transformers(kind, tmp_path, texts, docs_file, sample):
    from sentence_transformers import SentenceTransformer

    folder = BUILDERS[kind](tmp_path, sample.column("text").to_pylist()[:2000])
    st = SentenceTransformer(str(folder), device="cpu")
    out = tmp_path / "out"
    with warnings.catch_warnings():  # sentence-transformers saved empty prompts: nothing to notice
        warnings.simplefilter("error", EmbedkitNotice)
        s = embedkit.encode(docs_file, out, model=str(folder), device="cpu", dtype="float32", progress=False)
    table = lance.dataset(str(out / "vectors.lance")).to_table(columns=["id", "vector", "n_tokens", "truncated"])
    where = {d: i for i, d in enumerate(table.column("id").to_pylist())}
    rows = [where[d] for d in sample.column("id").to_pylist()[:ROWS]]
    got = np.stack(table.column("vector").to_numpy(zero_copy_only=False)[rows]).astype(np.float32)
    want = st.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cos = (got * want).sum(1)
    assert cos.min() > 0.9999, (kind, cos.min())
    # the tokenizer's own length: documents over it are cut there, as sentence-transformers cuts them
    limit = st.max_seq_length
    full = [len(st.tokenizer(t)["input_ids"]) for t in texts]
    assert s.truncated == sum(n > limit for n in full) > 0
    assert max(table.column("n_tokens").to_pylist()) == max(full)
    manifest = embedkit.status(out).manifest
    assert manifest["model"]["max_seq_length"] == limit and manifest["model"]["pooling"] in ("mean", "cls", "lasttoken")
