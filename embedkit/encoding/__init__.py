"""The encode stage: corpus -> OUT/vectors.lance, resumable shard by shard. Its public API
(`encode`, `run_encode`) and its shard function (`encode_shard`) for the executors.
"""
