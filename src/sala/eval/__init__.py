"""Long-context quality of SALA hybrids and dense models side by side: perplexity at several context lengths
(``ppl``), needle in a haystack over length x depth (``niah``), RULER's synthetic tasks (``ruler``), and an
lm-evaluation-harness model class (``sala.eval.lm_eval_adapter``, imported on demand: it needs ``lm-eval``).

Rooms below: ``sala.model`` (networks), ``sala.engine`` (loader, planner, token-count parsing), ``sala.utils``.
"""

from sala.eval.config import EvalOptions, NiahConfig, PplConfig, RulerConfig
from sala.eval.models import load_eval_model
from sala.eval.niah import run_niah
from sala.eval.ppl import run_ppl
from sala.eval.ruler import run_ruler
from sala.eval.scoring import exact_match, string_match_all

__all__ = [
    "EvalOptions",
    "NiahConfig",
    "PplConfig",
    "RulerConfig",
    "exact_match",
    "load_eval_model",
    "run_niah",
    "run_ppl",
    "run_ruler",
    "string_match_all",
]
