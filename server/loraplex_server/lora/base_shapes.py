"""A frozen snapshot of the base model's module shapes, for checking adapters away from the engine.

Upload validation runs on executor threads while the engine thread wraps layers in the live model;
reading the model there would race with it. The snapshot is plain data taken once, before any layer
is wrapped, so it always describes the base itself and is safe to read from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loraplex_adapters.peft_folder import AdapterFormatError, LoraAdapter
from loraplex_server.lora.layers import linear_shape


@dataclass(frozen=True)
class BaseShapes:
    linear: dict[str, tuple[int, int]]  # model path -> (in_features, out_features) of each linear-like layer
    other: dict[str, str]  # model path -> class name of every other module (named in refusals)
    prefix: str  # the task model's prefix (`bert`) that PEFT keys carry and a bare encoder lacks
    head_module: str
    hidden_size: int

    @classmethod
    def capture(cls, model: nn.Module, head_module: str, hidden_size: int) -> BaseShapes:
        """Record every module of `model`; call before any layer is wrapped."""
        linear, other = {}, {}
        for path, module in model.named_modules(remove_duplicate=False):
            shape = linear_shape(module)
            if shape is None:
                other[path] = type(module).__name__
            else:
                linear[path] = shape
        return cls(linear, other, getattr(model, "base_model_prefix", "") or "", head_module, hidden_size)

    def path(self, name: str) -> str:
        """The model path of a PEFT module name: PEFT keys name modules inside the task model
        (`bert.encoder...`), a bare encoder lacks the prefix."""
        candidates = [name]
        if self.prefix and name.startswith(self.prefix + "."):
            candidates.append(name[len(self.prefix) + 1:])
        for path in candidates:
            if path in self.linear or path in self.other:
                return path
        raise AdapterFormatError(f"target module {name} does not exist in the base model")

    def validate(self, adapter: LoraAdapter) -> None:
        """Raise AdapterFormatError if the adapter does not fit this base."""
        for name, weights in adapter.modules.items():
            path = self.path(name)
            shape = self.linear.get(path)
            if shape is None:
                raise AdapterFormatError(
                    f"target module {name} is a {self.other[path]}, not a linear layer; only linear "
                    "layers can carry LoRA here"
                )
            expected = ((weights.rank, shape[0]), (shape[1], weights.rank))
            got = (tuple(weights.A.shape), tuple(weights.B.shape))
            if got != expected:
                raise AdapterFormatError(
                    f"shape mismatch at {name}: lora_A {got[0]}, lora_B {got[1]}; the base layer is "
                    f"{shape[0]}->{shape[1]}, so expected {expected[0]} and {expected[1]}"
                )
        head = adapter.head
        if head is not None:
            if head.module != self.head_module:
                raise AdapterFormatError(
                    f"classification head `{head.module}` does not fit this base, which uses `{self.head_module}`"
                )
            if head.weight.shape[1] != self.hidden_size:
                raise AdapterFormatError(
                    f"shape mismatch at {head.module}: head input {head.weight.shape[1]}, "
                    f"base hidden size {self.hidden_size}"
                )
