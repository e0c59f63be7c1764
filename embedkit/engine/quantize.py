"""Quantized vectors: int8 with per-dimension ranges, and binary (sign bits packed).

The codes are those of sentence-transformers' `quantize_embeddings`: int8 maps each dimension's
calibrated [min, max] onto 256 steps, `floor((x - min) / step)` clipped to [0, 255], minus 128;
binary keeps the sign of each dimension, 8 to a byte (`np.packbits(x > 0)`, the "ubinary"
layout). Values outside the calibrated range land on the end steps.

How a stored column is to be read back travels with it, in the `vector` field's metadata, so
whatever reads vectors (the index build, search) decodes them without the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

QUANTIZED = ("int8", "binary")
METADATA_KEY = b"embedkit.quantization"


@dataclass(frozen=True)
class Quantization:
    """How vectors of `dim` dimensions are stored: "int8" (with `ranges`, shape (2, dim): each
    dimension's min and max on the calibration sample) or "binary"."""

    kind: str
    dim: int
    ranges: np.ndarray | None = None

    @staticmethod
    def calibrate(kind: str, sample: np.ndarray) -> Quantization:
        """The quantization of `kind` for vectors like `sample` (rows, dim), float."""
        if kind == "int8":
            sample = np.asarray(sample, np.float32)
            return Quantization("int8", sample.shape[1], np.vstack([sample.min(axis=0), sample.max(axis=0)]).astype(np.float32))
        if kind == "binary":
            if sample.shape[1] % 8:
                raise ValueError(f"binary vectors need a dimension divisible by 8, not {sample.shape[1]}")
            return Quantization("binary", sample.shape[1])
        raise ValueError(f"unknown quantization {kind!r}")

    @property
    def code_width(self) -> int:
        """Values per stored row: dim int8 values, or dim / 8 bytes."""
        return self.dim if self.kind == "int8" else self.dim // 8

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Float vectors (rows, dim) to codes: int8 (rows, dim) or uint8 (rows, dim / 8)."""
        x = np.asarray(x, np.float32)
        if self.kind == "binary":
            return np.packbits(x > 0, axis=1)
        assert self.ranges is not None
        starts, steps = self.ranges[0], _steps(self.ranges)
        return (np.clip(np.floor((x - starts) / steps), 0, 255) - 128).astype(np.int8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes back to float32 vectors: each int8 at the middle of its step; each bit as
        +-1/sqrt(dim), so binary rows are unit vectors and a float query's inner product with
        them is its sign-agreement score (the rescoring sentence-transformers recommends)."""
        if self.kind == "binary":
            bits = np.unpackbits(np.asarray(codes, np.uint8), axis=1, count=self.dim).astype(np.float32)
            return (bits * 2 - 1) / np.float32(np.sqrt(self.dim))
        assert self.ranges is not None
        return ((np.asarray(codes, np.float32) + 128.5) * _steps(self.ranges) + self.ranges[0]).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "dim": self.dim, **({"ranges": self.ranges.tolist()} if self.ranges is not None else {})})

    @staticmethod
    def from_json(text: str | bytes) -> Quantization:
        d = json.loads(text)
        ranges = np.asarray(d["ranges"], np.float32) if "ranges" in d else None
        return Quantization(d["kind"], int(d["dim"]), ranges)

    @staticmethod
    def of_field(field: Any) -> Quantization | None:
        """The quantization recorded on an Arrow `vector` field, or None for float vectors."""
        meta = field.metadata or {}
        return Quantization.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None


def _steps(ranges: np.ndarray) -> np.ndarray:
    # a dimension constant on the sample has no range: any step maps it to one code
    ranges = ranges.astype(np.float32, copy=False)
    steps = (ranges[1] - ranges[0]) / 255
    return np.where(steps == 0, 1, steps).astype(np.float32)
