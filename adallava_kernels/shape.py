"""Model shapes: the dimensions every plan, cost and kernel is checked against."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from .checks import check_int

__all__ = ["ModelShape", "PRESETS", "check_model_shape", "get_shape"]


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a Llama-family decoder (the language model of LLaVA-1.5).

    ``head_dim`` is stored rather than derived because transformers allows
    ``hidden_size != num_heads * head_dim``.
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in fields(self):
            check_int(f"ModelShape.{f.name}", getattr(self, f.name), positive_wording=True)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"ModelShape.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def heads_per_kv_head(self) -> int:
        """Query heads that share one KV head (1 for multi-head attention)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelShape":
        """Read a transformers ``LlamaConfig``, or a ``LlavaConfig`` (its text config)."""
        text = getattr(config, "text_config", None) or config
        required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
        missing = [name for name in required if getattr(text, name, None) is None]
        if missing:
            raise ValueError(
                f"config ({type(config).__name__}) is not a Llama-family config: missing {', '.join(missing)}"
            )
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        return cls(
            hidden_size=text.hidden_size,
            num_layers=text.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelShape":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"shape has unknown keys {unknown}; expected {sorted(names)}")
        return cls(**data)


# The text models of the llava-hf conversions of LLaVA-1.5 (Vicuna-v1.5 with the
# vocabulary padded to 32064 for the image token).
PRESETS: dict[str, ModelShape] = {
    "llava-7b": ModelShape(
        hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        head_dim=128, intermediate_size=11008, vocab_size=32064,
    ),
    "llava-13b": ModelShape(
        hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40,
        head_dim=128, intermediate_size=13824, vocab_size=32064,
    ),
    # Small enough for CPU runs and interpreter tests, with GQA and sizes that
    # are not powers of two so block-size assumptions show; 8 heads so that
    # AdaLLaVA-H's default rank of 8 divides them.
    "tiny": ModelShape(
        hidden_size=192, num_layers=4, num_heads=8, num_kv_heads=2,
        head_dim=24, intermediate_size=520, vocab_size=1000,
    ),
}


def get_shape(name: str) -> ModelShape:
    """A preset by name (``llava-7b``, ``llava-13b``, ``tiny``)."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}: name must be one of {sorted(PRESETS)}") from None


def check_model_shape(name: str, shape: object) -> ModelShape:
    """``shape`` if it is a :class:`ModelShape`, else ``ValueError`` naming ``name`` (a preset's name is not one:
    ``get_shape(name)`` gives it)."""
    if not isinstance(shape, ModelShape):
        hint = f" (get_shape({shape!r}) gives the preset)" if isinstance(shape, str) and shape in PRESETS else ""
        raise ValueError(f"{name} must be a ModelShape, got {type(shape).__name__}{hint}")
    return shape
