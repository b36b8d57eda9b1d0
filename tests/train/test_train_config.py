"""Training configs, the CLI's config errors, the workdir guard, the optimiser groups and schedule, the
accumulating step, and the per-process split of the data stream. All fast: nothing here compiles a
model."""

from __future__ import annotations

import json
import pathlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bokehdiff_jax.cli import main
from bokehdiff_jax.errors import InputError
from bokehdiff_jax.train import config as config_lib
from bokehdiff_jax.train import optim
from bokehdiff_jax.train.data import ProcessRows
from bokehdiff_jax.train.step import init_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_cpu.py")
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_resolves_with_the_required_keys(path):
    c = config_lib.resolve(str(path), [])
    assert all(k in c for k in config_lib.REQUIRED_KEYS)
    assert c.is_locked
    json.dumps(config_lib.to_dict(c))  # the resolved config is plain JSON


def test_overrides_are_typed_and_strict():
    c = config_lib.resolve(
        TINY,
        [
            "--config.steps=7",
            "--config.optimizer.lr=2e-4",
            "--config.pisa.occlusion=false",
            "--config.pisa_paths=('mid_block.*.attn1', 'up_blocks.*.attn1')",
            "--config.pisa.train_occlusion_clamp=0.99",
            "--config.model.unet.block_out_channels=(16, 32, 32)",
            "--config.data.fg=samples",
        ],
    )
    assert c.steps == 7 and c.optimizer.lr == 2e-4 and c.pisa.occlusion is False
    assert c.pisa_paths == ("mid_block.*.attn1", "up_blocks.*.attn1")
    assert c.pisa.train_occlusion_clamp == 0.99
    assert tuple(c.model.unet.block_out_channels) == (16, 32, 32)
    for bad, what in [
        ("--config.stepz=7", "unknown config key 'stepz'"),
        ("--config.optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
        ("--config.nope.x=1", "unknown config key 'nope'"),
        ("--config.steps=seven", "--config.steps=seven: expected an int"),
        ("--config.steps=1.5", "expected an int"),
        ("--config.pisa.occlusion=maybe", "expected a bool"),
        ("--config.optimizer=1", "is a group of keys"),
        ("--config.steps=0", "steps=0: expected an int >= 1"),
        ("--config.batch_size=3", "not divisible by optimizer.grad_accum"),
    ]:
        overrides = [bad] + (["--config.optimizer.grad_accum=2"] if "grad_accum" in what else [])
        with pytest.raises(InputError) as e:
            config_lib.resolve(TINY, overrides)
        assert what in str(e.value), (bad, str(e.value))
        assert "\n" not in str(e.value)


def test_variants_change_one_word_not_code():
    base = config_lib.resolve(TINY, [])
    abl = config_lib.resolve(TINY + ":no_occlusion,no_edge,pisa_all", [])
    assert base.pisa.occlusion and not abl.pisa.occlusion
    assert abl.losses.edge == 0.0 and abl.pisa_paths == ("*.attn1",)
    assert (
        config_lib.resolve(str(ROOT / "configs" / "sdxl_gpu1.py") + ":vanilla_attention", []).pisa_paths == ()
    )
    with pytest.raises(InputError, match="config variant 'no_such'"):
        config_lib.resolve(TINY + ":no_such", [])


def test_config_file_errors(tmp_path):
    (tmp_path / "missing.py").write_text(
        "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict({'steps': 1})\n"
    )
    with pytest.raises(InputError, match="missing required keys"):
        config_lib.load_config(str(tmp_path / "missing.py"))
    (tmp_path / "broken.py").write_text("def get_config(:\n")
    with pytest.raises(InputError, match="failed to load"):
        config_lib.load_config(str(tmp_path / "broken.py"))
    with pytest.raises(InputError, match="no such file"):
        config_lib.load_config(str(tmp_path / "absent.py"))


def test_cli_reports_a_bad_key_in_one_line_and_writes_nothing(tmp_path, capsys):
    work = tmp_path / "run"
    rc = main(["train", "--config", TINY, "--workdir", str(work), "--config.optimizer.lrr=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: unknown config key 'optimizer.lrr'"]
    assert not work.exists()
    # Extra arguments stay an error for the commands that take none.
    assert main(["render", "x.png", "--strength", "1", "--config.steps=1"]) == 2
    assert "unrecognized arguments: --config.steps=1" in capsys.readouterr().err


def test_workdir_guard(tmp_path):
    work = tmp_path / "run"
    c = config_lib.resolve(TINY, [])
    assert config_lib.check_workdir(work, c, False) == []
    config_lib.write_config(work, c)
    before = (work / "config.json").read_text()
    same_shapes = config_lib.resolve(TINY, ["--config.steps=999", "--config.optimizer.lr=1e-4"])
    notes = config_lib.check_workdir(work, same_shapes, True)
    assert notes and "optimizer.lr" in notes[0] and "steps" in notes[0]
    for override, key in [
        ("--config.resolution=32", "resolution"),
        ("--config.model.unet.block_out_channels=(16, 32, 32)", "model.unet.block_out_channels"),
        ("--config.trainable=lora", "trainable"),
    ]:
        other = config_lib.resolve(TINY, [override, "--config.data.synth_size=64"])
        with pytest.raises(InputError, match="shape-changing keys") as e:
            config_lib.check_workdir(work, other, True)
        assert key in str(e.value)
    assert (work / "config.json").read_text() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds other files"):
        config_lib.check_workdir(foreign, c, False)


def test_config_json_round_trip(tmp_path):
    c = config_lib.resolve(TINY + ":no_coc", ["--config.steps=5"])
    config_lib.write_config(tmp_path, c)
    back = config_lib.config_from_json(json.loads((tmp_path / "config.json").read_text()))
    assert config_lib.config_differences(config_lib.to_dict(back), config_lib.to_dict(c)) == ([], [])


# ------------------------------------------------------------------------------------------- optimiser
def _opt_config(**kw) -> ml_collections.ConfigDict:
    c = config_lib.default_config()
    c.steps = 100
    c.optimizer.warmup_steps = 10
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    for k, v in kw.items():
        config_lib.set_key(c, k, v)
    return c


def _tree():
    return {
        "model": {
            "unet": {"lora": {"a": {"A": jnp.ones((4, 2)), "B": jnp.zeros((2, 4))}}},
            "vae": {"params": {"conv_in": {"kernel": jnp.ones((3,))}}},
        },
        "discriminator": {"fc1": {"kernel": jnp.ones((5,))}},
    }


def test_groups_schedule_and_per_group_clipping():
    params = _tree()
    labels = optim.group_labels(params)
    assert labels["model"]["unet"]["lora"]["a"]["A"] == "lora"
    assert labels["model"]["vae"]["params"]["conv_in"]["kernel"] == "vae"
    assert labels["discriminator"]["fc1"]["kernel"] == "discriminator"
    assert optim.group_sizes(params) == {"lora": 16, "vae": 3, "discriminator": 5}

    c = _opt_config()
    unit = optim.unit_schedule(c.optimizer, c.steps)
    assert float(unit(0)) == 0.0 and abs(float(unit(5)) - 0.5) < 1e-6 and abs(float(unit(10)) - 1.0) < 1e-6
    assert float(unit(55)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 45 / 90)), abs=1e-6)
    assert float(unit(100)) == pytest.approx(0.0, abs=1e-7)
    assert optim.learning_rate(c, 10, "discriminator") == pytest.approx(2e-3)  # lr_scale 2

    tx = optim.make_optimizer(c, params)
    state = tx.init(params)
    g = jax.tree_util.tree_map(jnp.ones_like, params)
    huge = dict(g, discriminator={"fc1": {"kernel": jnp.full((5,), 1e6)}})
    u1, _ = tx.update(g, state, params)
    u2, _ = tx.update(huge, state, params)
    # The discriminator's huge gradient is clipped in its own group: the generator's update is unchanged.
    np.testing.assert_array_equal(
        u1["model"]["unet"]["lora"]["a"]["A"], u2["model"]["unet"]["lora"]["a"]["A"]
    )


def test_accumulated_step_equals_one_big_step():
    """Two micro-batches of 2 give the same update as one batch of 4 for a mean loss."""
    w_true = jnp.asarray([1.0, -2.0, 0.5])
    x = jax.random.normal(jax.random.key(0), (4, 3))
    batch = {"x": x, "y": x @ w_true}

    def loss_fn(params, carry, frozen, b, key, step):
        del frozen, key, step
        err = b["x"] @ params["model"]["vae"]["w"] - b["y"]
        return jnp.mean(err**2), ({"loss": jnp.mean(err**2)}, carry)

    params = {"model": {"vae": {"w": jnp.zeros(3)}}}
    c = _opt_config(**{"optimizer.warmup_steps": 0, "optimizer.clip_norm": 0.0})
    tx = optim.make_optimizer(c, params)
    out = []
    for accum in (1, 2):
        step = jax.jit(make_train_step(loss_fn, tx, accum=accum))
        state, metrics = step(init_state(params, tx), {}, batch, jax.random.key(1))
        out.append((state.params["model"]["vae"]["w"], metrics["loss"], metrics["grad_norm"]))
        assert bool(metrics["finite"]) and int(state.step) == 1
    np.testing.assert_allclose(out[0][0], out[1][0], rtol=1e-6)
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)
    np.testing.assert_allclose(out[0][2], out[1][2], rtol=1e-6)


def test_non_finite_step_is_flagged():
    def loss_fn(params, carry, frozen, b, key, step):
        v = jnp.sum(params["model"]["vae"]["w"] * b["x"])
        return v, ({"loss": v}, carry)

    params = {"model": {"vae": {"w": jnp.ones(2)}}}
    tx = optim.make_optimizer(_opt_config(), params)
    step = jax.jit(make_train_step(loss_fn, tx))
    _, ok = step(init_state(params, tx), {}, {"x": jnp.ones(2)}, jax.random.key(0))
    _, bad = step(init_state(params, tx), {}, {"x": jnp.asarray([1.0, jnp.nan])}, jax.random.key(0))
    assert bool(ok["finite"]) and not bool(bad["finite"])


# -------------------------------------------------------------------------------------------- data
def test_process_rows_give_the_same_global_batches():
    """Each process's rows of the stream, put side by side, are the one-process batches."""
    ds = grain.MapDataset.range(40).shuffle(seed=3)
    whole = [list(b) for b in ProcessRows(ds, 4, 4, 0).batch(4)][:5]
    halves = [[list(b) for b in ProcessRows(ds, 4, 2, off).batch(2)][:5] for off in (0, 2)]
    assert [a + b for a, b in zip(*halves, strict=True)] == whole
    assert len(ProcessRows(ds, 4, 2, 2)) == 20
    with pytest.raises(ValueError):
        ProcessRows(ds, 4, 2, 3)
