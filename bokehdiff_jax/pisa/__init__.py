"""PISA, the physics-inspired self-attention of BokehDiff (paper Sec. 3.2, SPEC section 2).

One public function, ``pisa_attention``, with dense (reference), blockwise (O(N * block) memory) and
sparse (CoC-limited) implementations chosen by ``PisaConfig.impl``, and ``pisa_attention_sharded`` to run
it over a ``jax.sharding.Mesh``.
"""

from bokehdiff_jax.pisa.api import pisa_attention, pisa_weights
from bokehdiff_jax.pisa.config import INFERENCE_HARDNESS, PisaConfig, training_hardness
from bokehdiff_jax.pisa.sharded import pisa_attention_sharded

__all__ = [
    "INFERENCE_HARDNESS",
    "PisaConfig",
    "pisa_attention",
    "pisa_attention_sharded",
    "pisa_weights",
    "training_hardness",
]
