"""Text around token ids, torch-free: tokenizers (byte-level and Hugging Face
`tokenizer.json`), incremental detokenizing with stop strings. The
scheduler, the gateway and the drivers all use it; importing it never
imports torch (tests/unit/test_layering.py checks)."""
