"""Image tokenizers: KL-16 VAE (256px) and DC-AE f32c32 (512px) in Flax."""
from emigm_jax.tokenizers.dcae import DC_AE_F32C32_IN, AutoencoderDC, DCAEConfig
from emigm_jax.tokenizers.registry import (DEFAULT_SCALES, TOKENIZER_NAMES, Tokenizer,
                                           build_tokenizer, moments_to_tokens_np)
from emigm_jax.tokenizers.vae import KL16, AutoencoderKL, KLVAEConfig
