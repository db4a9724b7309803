"""Hand-off of generated data to training and evaluation: `engine mix`, `engine export nanotron|lighteval`,
`engine compare`.

sources.py (generated rows, mix-in rows, tokenizer) -> mix.py (token-ratio mix, zstd Parquet) |
token_files.py (datatrove .ds/.ds.index/.ds.metadata) -> nanotron.py (folders, coverage, YAML) |
lighteval_export.py + early_signal_tasks.py (the cloze suite) -> compare.py (results table).
"""

# Synthetic share of tokens: 50/50 by default; the field's sweep found 60-80 % best for structured prompts.
PRESETS = {"default": 0.5, "faq": 0.6, "tutorial": 0.6, "table": 0.7, "math": 0.8}
