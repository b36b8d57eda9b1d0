"""The naming rule and layout hooks on hand-written keys (the whole-model tests are in test_end_to_end)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bokehdiff_jax.convert.mapping import MappingError, diffusers_to_flax, flax_to_diffusers
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.naming import flax_module_to_torch, torch_module_to_flax

S = jax.ShapeDtypeStruct


def test_naming_rule_examples_both_ways():
    cases = {
        "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0": (
            "down_blocks_1", "attentions_0", "transformer_blocks_1", "attn1", "to_out_0"),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj": (
            "down_blocks_0", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj"),
        "time_embedding.linear_1": ("time_embedding", "linear_1"),
        "encoder.mid_block.attentions.0.to_q": ("encoder", "mid_block", "attentions_0", "to_q"),
        "up_blocks.2.upsamplers.0.conv": ("up_blocks_2", "upsamplers_0", "conv"),
    }  # fmt: skip
    for torch_name, flax_path in cases.items():
        assert torch_module_to_flax(torch_name) == flax_path
        assert flax_module_to_torch(flax_path) == torch_name


@pytest.mark.parametrize("bad", ["linear.1", "down_blocks.attentions.0", "resnets", "a..b", "0.conv"])
def test_keys_that_break_the_rule_are_errors(bad):
    with pytest.raises(InputError):
        torch_module_to_flax(bad)


def _abstract():
    return {
        "params": {
            "conv_in": {"kernel": S((3, 3, 4, 8), np.float32), "bias": S((8,), np.float32)},
            "norm": {"scale": S((8,), np.float32), "bias": S((8,), np.float32)},
            "ff": {"net_2": {"kernel": S((8, 6), np.float32), "bias": S((6,), np.float32)}},
            "proj_in": {"kernel": S((1, 1, 8, 8), np.float32), "bias": S((8,), np.float32)},
        }
    }


def _torch_tensors(rng):
    return {
        "conv_in.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "conv_in.bias": rng.standard_normal(8).astype(np.float32),
        "norm.weight": rng.standard_normal(8).astype(np.float32),
        "norm.bias": rng.standard_normal(8).astype(np.float32),
        "ff.net.2.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "ff.net.2.bias": rng.standard_normal(6).astype(np.float32),
        "proj_in.weight": rng.standard_normal((8, 8, 1, 1)).astype(np.float32),
        "proj_in.bias": rng.standard_normal(8).astype(np.float32),
    }


def test_layouts_and_round_trip():
    t = _torch_tensors(np.random.default_rng(0))
    p = diffusers_to_flax(t, _abstract())["params"]
    np.testing.assert_array_equal(p["conv_in"]["kernel"][1, 2, 3, 5], t["conv_in.weight"][5, 3, 1, 2])
    np.testing.assert_array_equal(p["ff"]["net_2"]["kernel"], t["ff.net.2.weight"].T)
    np.testing.assert_array_equal(p["norm"]["scale"], t["norm.weight"])
    back = flax_to_diffusers(p)
    assert set(back) == set(t)
    for k in t:
        assert back[k].tobytes() == t[k].tobytes(), k


def test_casts_to_the_abstract_dtype():
    abstract = jax.tree.map(lambda s: S(s.shape, jax.numpy.bfloat16), _abstract())
    p = diffusers_to_flax(_torch_tensors(np.random.default_rng(1)), abstract)["params"]
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(p))


def test_strict_one_error_lists_everything():
    t = _torch_tensors(np.random.default_rng(2))
    del t["norm.bias"]  # missing
    t["extra.weight"] = np.zeros(3, np.float32)  # unexpected
    t["ff.net.2.weight"] = np.zeros((6, 7), np.float32)  # shape mismatch
    t["conv_in.bias"] = np.zeros((8, 1), np.float32)  # rank mismatch
    with pytest.raises(MappingError) as e:
        diffusers_to_flax(t, _abstract(), what="tiny")
    err = e.value
    assert err.missing == ["norm/bias (= norm.bias)"]
    assert err.unexpected == ["extra.weight"]
    assert len(err.mismatched) == 2
    msg = str(err)
    assert "norm/bias" in msg and "extra.weight" in msg and "ff.net.2.weight" in msg and "\n" not in msg


def test_deprecated_vae_attention_names_are_read():
    attn = {"to_q": {"kernel": S((4, 4), np.float32)}, "to_out_0": {"kernel": S((4, 4), np.float32)}}
    abstract = {"encoder": {"mid_block": {"attentions_0": attn}}}
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    p = diffusers_to_flax({"encoder.mid_block.attentions.0.query.weight": w,
                           "encoder.mid_block.attentions.0.proj_attn.weight": w}, abstract)  # fmt: skip
    np.testing.assert_array_equal(p["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"], w.T)
    assert set(flax_to_diffusers(p)) == {"encoder.mid_block.attentions.0.to_q.weight",
                                         "encoder.mid_block.attentions.0.to_out.0.weight"}  # fmt: skip


def test_unknown_flax_leaf_is_an_error():
    with pytest.raises(InputError, match="fits no parameter kind"):
        flax_to_diffusers({"x": {"embedding": np.zeros((2, 3))}})


def test_dotted_linen_names_are_an_error():
    # One spelling only: "down_blocks.0" as a linen name would make checkpoint keys model-dependent.
    abstract = {"down_blocks.0": {"resnets_0": {"conv1": {"kernel": S((3, 3, 2, 4), np.float32)}}}}
    t = {"down_blocks.0.resnets.0.conv1.weight": np.ones((4, 2, 3, 3), np.float32)}
    with pytest.raises(InputError, match="holds a '.'"):
        diffusers_to_flax(t, abstract)
    with pytest.raises(InputError, match="holds a '.'"):
        flax_to_diffusers({"linear.1": {"bias": np.zeros(2)}})


class _CountingReads(dict):
    """A state dict that counts value reads (``keys``/shapes alone must not read data)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.reads: dict[str, int] = {}

    def __getitem__(self, k):
        self.reads[k] = self.reads.get(k, 0) + 1
        return super().__getitem__(k)

    @property
    def infos(self):  # what our safetensors readers expose: shapes from the header, no data
        return {k: S(dict.__getitem__(self, k).shape, np.float32) for k in self}


def test_each_source_tensor_is_read_exactly_once_and_only_after_the_check():
    t = _CountingReads(_torch_tensors(np.random.default_rng(3)))
    diffusers_to_flax(t, _abstract())
    assert t.reads == dict.fromkeys(t, 1)
    bad = _CountingReads({**_torch_tensors(np.random.default_rng(3)), "stray.bias": np.zeros(1, np.float32)})
    with pytest.raises(MappingError):
        diffusers_to_flax(bad, _abstract())
    assert bad.reads == {}  # a mismatch is found from names and shapes before any data is read


def test_integer_source_tensors_are_refused_not_cast():
    t = _torch_tensors(np.random.default_rng(0))
    t["norm.bias"] = np.arange(8, dtype=np.int32)
    with pytest.raises(InputError, match=r"norm\.bias.*int32.*floating point"):
        diffusers_to_flax(t, _abstract())
