"""Stat-drift debugging: batch-statistics vs global-statistics outputs and per-layer BatchNorm
drift, computed from reference.onnx by graph rewriting (no torch)."""
