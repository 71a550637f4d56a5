"""Input pipelines: digits, image folders, tfds, cached latents."""
from emigm_jax.data.preprocess import adm_center_crop

__all__ = ["adm_center_crop"]
