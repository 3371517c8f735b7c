"""Two lines every training run printed that tell its user nothing, each silenced at its source, by exact
message, for the trainer only.

- bitsandbytes (imported by peft) logs "Failed to load CPU gemm_4bit_forward from kernels-community ...
  pip install kernels" as a WARNING on its `bitsandbytes.backends.cpu.ops` logger when it is imported on
  a CPU with AVX512-BF16. The kernel it misses would only speed up an nf4 base on the CPU, which then
  runs bitsandbytes' own kernel; the trainer's CPU default is an unquantized base, and the remedy (the
  `kernels` package fetches kernels from the Hugging Face Hub) cannot work offline.
- transformers 5 deprecates `PreTrainedModel.is_gradient_checkpointing`, which peft's `PeftModel` still
  reads while wrapping the model: a FutureWarning addressed to peft's maintainers, not to a trainer.
- Where torchao is installed, peft imports it while wrapping the model, and its import logs "Failed to
  load ...so" for each prebuilt extension that does not fit this Python or has no GPU to run on, and
  torch logs that its Enum types "are now natively supported" (addressed to torchao's maintainers).
  The trainer uses none of torchao.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# (logger, the start of the message as the library writes it: a format string or an f-string's output)
LOG_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "%s is an Enum subclass and is now natively supported"),
)
PEFT_DEPRECATED_PROPERTY = r"`is_gradient_checkpointing` is deprecated"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def silence_import_notices() -> None:
    """Before the libraries are first imported: a logger exists from its first getLogger, and the module
    that logs takes the same one."""
    for name, prefix in LOG_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


@contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Around get_peft_model: drops transformers' deprecation warning that peft's own code triggers."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_DEPRECATED_PROPERTY, category=FutureWarning)
        yield
