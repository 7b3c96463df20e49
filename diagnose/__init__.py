"""The three papers' theory applied to a user's own trained PEFT LoRA adapter (``lora-theory diagnose``).

- :func:`diagnose_adapter` (``report.py``): a ``save_pretrained`` folder or a ``PeftModel`` -> :class:`Report`
  (``.layers``, ``.problems``, ``.notes``, ``.to_json()``, ``.table()``, ``.plot()``); optional base model and
  calibration batch. The JSON layout: ``diagnose/report.schema.json`` (``schema()``).
- :data:`FLAGS` (``flags.py``): every flag declared once (name, kind problem/note, rule, threshold, explanation),
  read by the report, the CLI legend, ``--fail-on`` and the training monitor alike.
- :func:`load_adapter` (``adapter.py``): per layer A, B, r, alpha and scaling as PEFT resolves them.
- :mod:`diagnose.quantities`: the per-layer numbers (rsLoRA regime, ALLoRA rows, LoWR channels, m_l, intruder
  dimensions, exact dropout penalty), computed with :mod:`analysis`.
- :class:`AdapterMonitor` and :func:`DiagnoseCallback` (``training.py``): the same quantities every k steps.
- :class:`DiagnoseError`: bad input, with the file and what was expected.

Convention (torch.nn.Linear / PEFT): A = lora_A (r, d_in), B = lora_B (d_out, r), update s B A (d_out, d_in);
the dropout rate p is the probability of zeroing. peft / transformers / safetensors are imported lazily: reading
a folder needs only torch and numpy, and --base reads safetensors weights layer by layer without transformers.
"""

from diagnose.adapter import AdaptedLayer, Adapter, load_adapter, resolve_rank_alpha
from diagnose.errors import DiagnoseError
from diagnose.flags import FLAGS, Flag
from diagnose.report import SCHEMA_VERSION, LayerReport, Report, diagnose_adapter, schema
from diagnose.training import AdapterMonitor, DiagnoseCallback

__all__ = [
    "FLAGS",
    "SCHEMA_VERSION",
    "Flag",
    "AdaptedLayer",
    "Adapter",
    "AdapterMonitor",
    "DiagnoseCallback",
    "DiagnoseError",
    "LayerReport",
    "Report",
    "diagnose_adapter",
    "load_adapter",
    "resolve_rank_alpha",
    "schema",
]
