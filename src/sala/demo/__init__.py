"""``sala demo``: what sala is for, in a few minutes on a CPU. A real pre-trained Transformer (SmolLM2-135M-Instruct,
or ``--model DIR``) beside its SALA hybrid (``sala.convert`` + the trained delta of ``sala.train``): streamed chat
answers, needle in a haystack inside and past the dense model's window, held-out perplexity (``sala.eval``), and
prefill / decode time and cache memory as the context grows. Writes a report folder (Markdown + PNGs).

Sits above the rooms (imports convert, train, eval, engine); only ``sala.cli`` imports it.
"""

from sala.demo.config import DemoConfig
from sala.demo.run import run_demo

__all__ = ["DemoConfig", "run_demo"]
