"""Integrations with other libraries, each import-guarded (its library is an optional extra):
`pangu_ops.integrations.transformers` — the "pangu_ops" experts backend for Hugging Face models."""
