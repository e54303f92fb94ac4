"""sala: MiniCPM-SALA hybrid long-context models (Lightning linear + InfLLM-v2 sparse attention).

Importing ``sala`` registers the ``minicpm_sala`` model type with transformers' Auto classes.
"""

from sala.model import SALAConfig, SALAForCausalLM, SALAModel, preset

__version__ = "0.1.0"
__all__ = ["SALAConfig", "SALAForCausalLM", "SALAModel", "__version__", "preset"]
