"""What embeddings tell: the vector index, image fingerprints, the reuse check, a version's reference and scoring
history.
"""
