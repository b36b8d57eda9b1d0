"""The naming rule between diffusers module paths and Flax param-tree paths (its one home).

A Flax module name is the diffusers module name with each numeric index joined to the preceding name
by ``"_"``::

    down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0
    <-> ("down_blocks_1", "attentions_0", "transformer_blocks_1", "attn1", "to_out_0")

An index may only follow one of the ``INDEXED_CONTAINERS`` (diffusers' ``ModuleList`` /
``Sequential`` attributes); that is what makes the rule invertible (``time_embedding.linear_1`` is a
module *called* ``linear_1``, not index 1 of ``linear``). There is one spelling: a linen name holding
a ``"."`` is an error. The models name their children by this rule, ``convert`` maps weights by it,
and LoRA / PISA placements are patterns over the diffusers side.
"""

from __future__ import annotations

from bokehdiff_jax.errors import InputError

# diffusers attributes that are ModuleLists/Sequentials: the only names an index may follow.
INDEXED_CONTAINERS: frozenset[str] = frozenset(
    {"down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks", "downsamplers",
     "upsamplers", "to_out", "net"}
)  # fmt: skip


def torch_module_to_flax(module: str) -> tuple[str, ...]:
    """``"down_blocks.1.attentions.0"`` -> ``("down_blocks_1", "attentions_0")``.

    Raises ``InputError`` if an index does not follow an ``INDEXED_CONTAINERS`` name, or an indexed
    container has no index.
    """
    out: list[str] = []
    tokens = module.split(".")
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok or tok.isdigit():
            raise InputError(
                f"key {module!r}: unexpected component {tok!r} (an index must follow one "
                f"of {sorted(INDEXED_CONTAINERS)})"
            )
        if tok in INDEXED_CONTAINERS:
            if i + 1 >= len(tokens) or not tokens[i + 1].isdigit():
                raise InputError(f"key {module!r}: {tok!r} must be followed by an index")
            out.append(f"{tok}_{tokens[i + 1]}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return tuple(out)


def flax_module_to_torch(path: tuple[str, ...]) -> str:
    """``("down_blocks_1", "attentions_0")`` -> ``"down_blocks.1.attentions.0"``."""
    parts = []
    for name in path:
        head, sep, idx = name.rpartition("_")
        if "." in name:
            raise InputError(
                f"Flax path {'/'.join(path)!r}: module name {name!r} holds a '.'; "
                "expected the '_' spelling (down_blocks_1, not down_blocks.1)"
            )
        if sep and idx.isdigit() and head in INDEXED_CONTAINERS:
            parts += [head, idx]
        elif name in INDEXED_CONTAINERS:
            raise InputError(f"Flax path {'/'.join(path)!r}: module name {name!r} needs an index")
        else:
            parts.append(name)
    return ".".join(parts)
