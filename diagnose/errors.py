"""The one exception of :mod:`diagnose`: bad input (a file, a config, a calibration batch) explained."""

from __future__ import annotations


class DiagnoseError(ValueError):
    """Bad input to the diagnosis: the message names the file or argument and says what was expected.

    A ``ValueError`` like every bad-input error of the toolkit; ``lora-theory diagnose`` prints it and exits
    with status 2 (no traceback, no partial report).
    """
