"""The compute engine: what runs models on batches, with no notion of OUT, shards or runs.

Tokenizer pools, length bucketing and token-budget packing, the encoder's forward pass and its
attention choices, embedkit's own BERT, the slot decoder, model resolution and process settings.
Imports only the base modules (`errors`, `config`, ...): never io, run, plan or a stage.
"""
