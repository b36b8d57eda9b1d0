"""peft <-> Flax LoRA mapping (convert.lora): exact round trips, layouts, strict errors.
Parity with real peft weights on a tiny U-Net is in tests/models/test_unet_parity.py."""

import jax
import ml_dtypes
import numpy as np
import pytest

from bokehdiff_jax.convert.lora import flax_lora_to_peft, peft_to_flax_lora
from bokehdiff_jax.convert.mapping import MappingError
from bokehdiff_jax.errors import InputError

ATTN = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"
CONV = "down_blocks.0.resnets.1.conv1"


def _tree(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(dtype)
    return {
        "down_blocks_0": {"resnets_1": {"conv1": {"A": r(3, 3, 6, 4), "B": r(4, 5)}}},
        "down_blocks_1": {
            "attentions_0": {"transformer_blocks_0": {"attn1": {"to_out_0": {"A": r(8, 4), "B": r(4, 7)}}}}
        },
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_round_trip_is_exact_and_layouts_are_pytorchs(dtype):
    tree = _tree(dtype)
    sd = flax_lora_to_peft(tree)
    assert sorted(sd) == sorted(f"unet.{m}.lora_{f}.weight" for m in (ATTN, CONV) for f in "AB")
    a, b = tree["down_blocks_0"]["resnets_1"]["conv1"]["A"], tree["down_blocks_0"]["resnets_1"]["conv1"]["B"]
    # torch Conv2d weights are [out, in, kh, kw]: A is a conv in -> r, B a 1x1 conv r -> out.
    np.testing.assert_array_equal(sd[f"unet.{CONV}.lora_A.weight"], np.transpose(a, (3, 2, 0, 1)))
    np.testing.assert_array_equal(sd[f"unet.{CONV}.lora_B.weight"][:, :, 0, 0], b.T)
    lin_a = tree["down_blocks_1"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_out_0"]["A"]
    assert sd[f"unet.{ATTN}.lora_A.weight"].shape == (4, 8)  # torch Linear: [out, in] = [r, in]
    np.testing.assert_array_equal(sd[f"unet.{ATTN}.lora_A.weight"], lin_a.T)
    assert all(v.dtype == dtype and v.flags.c_contiguous for v in sd.values())

    back = peft_to_flax_lora(sd, _abstract(tree))
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    # No prefix, and peft's live spelling with the adapter name: the same tree.
    bare = flax_lora_to_peft(tree, prefix="")
    live = {k.replace(".weight", ".default.weight"): v for k, v in bare.items()}
    for sd2 in (bare, live):
        jax.tree.map(np.testing.assert_array_equal, peft_to_flax_lora(sd2, _abstract(tree)), tree)


def test_every_mismatch_is_listed():
    tree = _tree()
    sd = flax_lora_to_peft(tree)
    del sd[f"unet.{CONV}.lora_B.weight"]
    sd[f"unet.{ATTN}.lora_A.weight"] = np.zeros((4, 9), np.float32)  # wrong in-features
    sd["unet.mid_block.resnets.0.conv1.lora_A.weight"] = np.zeros((4, 6, 3, 3), np.float32)  # no such module
    sd["text_encoder.layers.0.q_proj.lora_A.weight"] = np.zeros((4, 8), np.float32)  # another model
    sd[f"unet.{CONV}.lora_A.other.weight"] = np.zeros((4, 6, 3, 3), np.float32)  # another adapter
    sd["unet.down_blocks.0.resnets.1.conv1.weight"] = np.zeros((5, 6, 3, 3), np.float32)  # base weight
    with pytest.raises(MappingError) as e:
        peft_to_flax_lora(sd, _abstract(tree))
    err = e.value
    assert isinstance(err, InputError)
    assert err.missing == ["down_blocks_0/resnets_1/conv1/B"]
    assert len(err.unexpected) == 4 and all(k in str(err) for k in err.unexpected)
    assert len(err.mismatched) == 1 and "(4, 9)" in err.mismatched[0]

    dup = flax_lora_to_peft(tree)
    dup[f"{CONV}.lora_A.weight"] = dup[f"unet.{CONV}.lora_A.weight"]  # the same factor twice
    with pytest.raises(MappingError, match="second tensor"):
        peft_to_flax_lora(dup, _abstract(tree))


def test_bad_trees_are_input_errors():
    with pytest.raises(InputError, match="expected <module path>/A"):
        flax_lora_to_peft({"conv_in": {"kernel": np.zeros((3, 3, 4, 4))}})
    with pytest.raises(InputError, match="B factor but no A"):
        flax_lora_to_peft({"conv_in": {"B": np.zeros((4, 4))}})
