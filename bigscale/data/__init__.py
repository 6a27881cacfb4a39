"""Data: sources and pre-flight checks, tokenization with loss masks, packing, sampling.

Modules are imported directly (``bigscale.data.sources`` etc.) so the launcher's pre-flight does
not pay for importing torch.

- ``sources``: resolve and check local files (``preflight``), load raw splits (``load_raw``).
- ``tokenize``: ``encode_example``, ``tokenize_split`` and its ``TokenizeReport``, ``cache_key``.
- ``chat``: chat templates (built-in and user), conversation checks, the assistant-only mask.
- ``collate``: ``pad_collate``, ``pack_examples``/``pack_collate``, ``real_token_fraction``.
- ``sampler``: ``ResumableDistributedSampler``.
- ``tasks``: the built-in arithmetic task.
- ``pipeline``: ``build_datasets`` (tokenize once per job) and ``build_loader``.
- ``cache``: one rank builds the tokenized cache, the others wait on its marker file.
- ``mixture``: ``data.mixture`` sources and weights, data identity by content.
- ``streaming``: ``data.streaming``, each rank's resumable share of a stream.
"""
