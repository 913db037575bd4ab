"""Exporters: torch -> ONNX with a parity check, and converters of published checkpoints."""
