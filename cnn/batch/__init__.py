"""Batch scoring: plan shards against what the tables hold, score each shard, publish to prediction tables (files,
SQL, object stores).
"""
