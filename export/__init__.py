"""export: FX → ONNX, saving, ONNX Runtime sessions and parity checks."""

from __future__ import annotations
