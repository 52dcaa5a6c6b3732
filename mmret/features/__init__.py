"""The feature cache: frozen-tower outputs of a dataset, computed once (`encode`), kept on disk
memory-mapped (`cache`), read as training pairs (`source`), and filled on demand by `mmret
precompute-embeddings` (`precompute`)."""

from mmret.features.cache import (
    CAPTIONS, CachedFeatures, EncodeStats, FeatureCache, cache_rows, dataset_fingerprint, feature_key, features_root,
    open_features,
)
from mmret.features.encode import ensure_features
from mmret.features.source import FeatureSource

__all__ = ["CAPTIONS", "CachedFeatures", "EncodeStats", "FeatureCache", "FeatureSource", "cache_rows",
           "dataset_fingerprint", "ensure_features", "feature_key", "features_root", "open_features"]
