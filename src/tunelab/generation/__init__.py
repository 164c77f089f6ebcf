"""The one generation engine: rows decoding in a shared, continuously batched KV cache (decoder.py), each with its
own sampling (sampling.py) and incrementally decoded text (text.py), driven by a server's thread or a list of
prompts (engine.py)."""
