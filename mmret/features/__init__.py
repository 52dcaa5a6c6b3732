"""The feature cache: frozen-tower outputs of a dataset, computed once (`encode`), kept on disk
memory-mapped (`cache`), read as training pairs (`source`), and filled on demand by `mmret
precompute-embeddings` (`precompute`)."""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "CAPTIONS": "mmret.features.cache",
    "CachedFeatures": "mmret.features.cache",
    "EncodeStats": "mmret.features.cache",
    "FeatureCache": "mmret.features.cache",
    "FeatureSource": "mmret.features.source",
    "PrecomputeConfig": "mmret.features.config",
    "cache_rows": "mmret.features.cache",
    "dataset_fingerprint": "mmret.features.cache",
    "ensure_features": "mmret.features.encode",
    "feature_key": "mmret.features.cache",
    "features_root": "mmret.features.cache",
    "open_features": "mmret.features.cache",
})
__all__ = sorted(["CAPTIONS", "CachedFeatures", "EncodeStats", "FeatureCache", "FeatureSource", "PrecomputeConfig",
                  "cache_rows", "dataset_fingerprint", "ensure_features", "feature_key", "features_root",
                  "open_features"])
