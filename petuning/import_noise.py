"""Keep ``import petuning`` quiet on CPU machines: one bitsandbytes log record is held back.

peft imports bitsandbytes whenever it is installed. On CPUs with AVX512-BF16, bitsandbytes then tries to fetch an
optional 4-bit GEMM kernel from the Hub (``kernels-community``) and logs a warning when it cannot, although its
built-in CPU kernels work. petuning drops that record, and only that one, before peft is imported; the text is
kept in :data:`held_back` so that code loading a 4-bit base (the recipes) can report it where it matters.
"""

from __future__ import annotations

import logging

_LOGGER = "bitsandbytes.backends.cpu.ops"
_PREFIX = "Failed to load CPU gemm_4bit_forward"

held_back: list[str] = []
"""The bitsandbytes messages this filter dropped, in order."""


class _HoldBackKernelFetchWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_PREFIX):
            held_back.append(message)
            return False
        return True


logging.getLogger(_LOGGER).addFilter(_HoldBackKernelFetchWarning())
