"""Dense Transformer -> SALA: key-map adapters, weight inheritance, identity check, HALO layer selection, reports.

Entry points for the CLI: :func:`run_convert` (``sala convert``) and :func:`run_select_layers`
(``sala select-layers``), each taking a ``kw_only`` config dataclass.
"""

from sala.convert.adapters import (
    SUPPORTED_FAMILIES,
    ConversionError,
    SourceSpec,
    SourceTensorError,
    UnsupportedArchitectureError,
    read_source,
)
from sala.convert.inherit import InitOptions, build_sala_model, write_sala_checkpoint
from sala.convert.pipeline import ConvertConfig, ConvertResult, parse_layers, run_convert
from sala.convert.select import SelectConfig, SelectionResult, run_select_layers
from sala.convert.verify import IdentityCheckError, IdentityReport, verify_identity

__all__ = [
    "SUPPORTED_FAMILIES",
    "ConversionError",
    "ConvertConfig",
    "ConvertResult",
    "IdentityCheckError",
    "IdentityReport",
    "InitOptions",
    "SelectConfig",
    "SelectionResult",
    "SourceSpec",
    "SourceTensorError",
    "UnsupportedArchitectureError",
    "build_sala_model",
    "parse_layers",
    "read_source",
    "run_convert",
    "run_select_layers",
    "verify_identity",
    "write_sala_checkpoint",
]
