"""The torch engine (CUDA when present, CPU otherwise; same code path)."""
