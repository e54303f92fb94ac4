"""sala: MiniCPM-SALA hybrid long-context models (Lightning linear + InfLLM-v2 sparse attention).

Importing ``sala`` registers the ``minicpm_sala`` model type with transformers' Auto classes.
"""

import os

# Large CPU tensors on transparent huge pages: PyTorch's allocator reads THP_MEM_ALLOC_ENABLE at its first large
# allocation. A long CPU prefill creates hundreds of 75-200 MB activations, and faulting each in 4 KB pages cost
# 7x the time of writing it (200 MB: 80 vs 11 ms), so the SmolLM2 hybrid's 8K prefill went 35.1 -> 30.9 s.
# THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from sala.model import SALAConfig, SALAForCausalLM, SALAModel, preset  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SALAConfig", "SALAForCausalLM", "SALAModel", "__version__", "preset"]
