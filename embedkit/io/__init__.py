"""Data in and out: corpus readers, the Lance vector store and its transaction ledger, the shard
plan with OUT's manifest and lock, and export. Imports only the base modules.
"""
