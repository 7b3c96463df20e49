"""The top layer: the ``lora-theory`` command (:mod:`lora_theory.cli`), over ``analysis``, ``toymodels``,
``figures`` and ``diagnose``. Nothing below imports it."""
