"""``bokehdiff-jax export WORKDIR``: a training workdir's checkpoint (written by train.checkpoint itself)
-> export files equal to exporting the same trained tree directly."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from export_helpers import assert_trees_equal, random_trained, write_base

from bokehdiff_jax import cli
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.export.bundle import export_model
from bokehdiff_jax.export.workdir import trained_from_workdir
from bokehdiff_jax.train import config as config_lib
from bokehdiff_jax.train.checkpoint import Checkpoints
from bokehdiff_jax.train.step import TrainState


def _workdir(tmp_path, base, trained, steps=(2, 5)):
    c = config_lib.default_config()
    c.base = str(base)
    c.lora.rank, c.lora.alpha = trained.spec.lora.rank, trained.spec.lora.alpha
    c.pisa.impl = "dense"
    workdir = tmp_path / "run"
    ckpts = Checkpoints(workdir, keep=3, keep_every=0, async_save=False)
    for step in steps:
        scale = 1.0 if step == steps[-1] else 0.5  # the latest checkpoint holds the trained tree itself
        model = jax.tree.map(lambda x, s=scale: jnp.asarray(x) * s, trained.trainable)
        params = {"model": model, "discriminator": {"head": jnp.ones((3, 2))}}
        opt_state = {"mu": jax.tree.map(jnp.zeros_like, params)}
        state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state, carry={})
        data = iter(grain.MapDataset.range(4).to_iter_dataset())
        ckpts.save(step, state, jax.random.key(0), data, config_lib.to_dict(c))
    ckpts.wait()
    ckpts.close()
    return workdir, c


@pytest.mark.filterwarnings("ignore:.*random prompt embeddings")
def test_workdir_export_equals_the_direct_export(tmp_path):
    base = write_base(tmp_path / "base", "mini")
    trained = random_trained(base, rank=4, alpha=8.0, seed=7)
    workdir, config = _workdir(tmp_path, base, trained)
    got = trained_from_workdir(workdir, fingerprint=False)
    assert_trees_equal(got.trainable, trained.trainable)  # latest step; params["model"] only
    assert got.spec.lora == trained.spec.lora and got.spec.vae_parts == trained.spec.vae_parts
    assert got.spec.routing.pisa_paths == tuple(config.pisa_paths)
    assert got.spec.routing.pisa.impl == "dense" and got.spec.timestep == 499
    early = trained_from_workdir(workdir, 2, fingerprint=False)  # an earlier step on request
    half = jax.tree.map(lambda x: np.asarray(x) * np.float32(0.5), trained.trainable)
    assert_trees_equal(early.trainable, half)
    with pytest.raises(InputError, match="no checkpoint of step 3"):
        trained_from_workdir(workdir, 3, fingerprint=False)

    assert cli.main(["export", str(workdir), "--to", str(tmp_path / "a"), "--no-fingerprint"]) == 0
    direct = type(trained)(got.trainable, got.cond, got.spec, got.source)
    export_model(direct, tmp_path / "b")
    for name in ("pytorch_lora_weights.safetensors", "vae_encoder.safetensors", "prompt_embeds.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert cli.main(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "c")]) == 2
