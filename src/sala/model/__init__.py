"""The network as HF sees it: config, modeling, hybrid cache, official checkpoint I/O, Auto* registration."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from sala.model.cache import HybridCache
from sala.model.checkpoint_io import CheckpointError, expected_shapes, verify_checkpoint
from sala.model.configuration_sala import SALAConfig, mixer_schedule, preset
from sala.model.modeling_sala import SALAForCausalLM, SALAModel, SALAPreTrainedModel
from sala.model.quantize import FP8Config, FP8Linear, quantize_fp8_


def _register() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load ``model_type = "minicpm_sala"`` without remote code."""
    try:
        AutoConfig.register("minicpm_sala", SALAConfig)
    except ValueError:  # already registered (module reloaded)
        pass
    for auto, cls in ((AutoModel, SALAModel), (AutoModelForCausalLM, SALAForCausalLM)):
        try:
            auto.register(SALAConfig, cls)
        except ValueError:
            pass


_register()

__all__ = [
    "CheckpointError",
    "FP8Config",
    "FP8Linear",
    "HybridCache",
    "SALAConfig",
    "SALAForCausalLM",
    "SALAModel",
    "SALAPreTrainedModel",
    "expected_shapes",
    "mixer_schedule",
    "preset",
    "quantize_fp8_",
    "verify_checkpoint",
]
