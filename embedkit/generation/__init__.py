"""The generate stage: summarize / score / classify a corpus with a causal LM into
OUT/generations.lance, resumable shard by shard; its shard function for the executors.
"""
