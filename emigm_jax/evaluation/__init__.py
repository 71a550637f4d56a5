"""Evaluation: FID Inception-v3 (Flax), FID/sFID/IS/precision-recall, reference statistics."""
from emigm_jax.evaluation.inception import (FIDInceptionV3, make_feature_fn, pad_batch,
                                            preprocess_images, resize_matrix)
from emigm_jax.evaluation.metrics import (RunningStats, frechet_distance, gaussian_stats,
                                          inception_score, manifold_radii, precision_recall)
from emigm_jax.evaluation.reference import (FeatureSummary, ReferenceStats, compute_metrics,
                                            iter_image_folder, iter_npz_images,
                                            load_reference_stats, reference_pool_features,
                                            summarize_features, write_adm_reference)

__all__ = [
    "FIDInceptionV3", "make_feature_fn", "pad_batch", "preprocess_images", "resize_matrix",
    "RunningStats", "frechet_distance", "gaussian_stats", "inception_score", "manifold_radii",
    "precision_recall", "FeatureSummary", "ReferenceStats", "compute_metrics",
    "iter_image_folder", "iter_npz_images", "load_reference_stats", "reference_pool_features",
    "summarize_features", "write_adm_reference",
]
