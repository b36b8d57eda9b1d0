"""``OneStep``: loading every source kind, equality with the model it loads, determinism, one compilation
per shape, focal stacks, and the tiled VAE around a one-pass U-Net."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pipeline_helpers import write_workdir

from bokehdiff_jax.errors import InputError
from bokehdiff_jax.models.attention import AttentionRouting
from bokehdiff_jax.models.configs import VAEConfig
from bokehdiff_jax.physics.focus import stack_focus
from bokehdiff_jax.pipeline import OneStep, load_model, source_kind
from bokehdiff_jax.pipeline.onestep import vae_needs_tiling


def _inputs(seed, b, h, w):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
    disparity = np.repeat(np.linspace(0.1, 0.9, w, dtype=np.float32)[None], h, 0)
    disparity = np.broadcast_to(disparity, (b, h, w)).copy()
    disparity[:, h // 3 : 2 * h // 3, w // 3 : 2 * w // 3] = 0.95  # a near square: occlusion happens
    return image, disparity


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return write_workdir(tmp_path_factory.mktemp("run") / "run", "all")


@pytest.fixture(scope="module")
def onestep(workdir):
    return OneStep.from_checkpoint(workdir[0])  # shared: its compilations are reused across tests


def test_workdir_model_renders_as_the_trained_model(workdir, onestep):
    root, config, model, variables = workdir
    assert source_kind(root) == "workdir" and source_kind(root / "checkpoints" / "3") == "workdir"
    render = onestep
    assert render.model.unet.routing.pisa.impl == "auto" and render.model.unet.remat is False
    traces = render.traces  # compilations of this model structure so far in this process
    image, disparity = _inputs(0, 2, 16, 24)
    focus, strength = np.asarray([0.3, 0.7], np.float32), np.asarray([6.0, 9.0], np.float32)
    out = render(image, disparity, focus, strength)
    # The reference: the model the trainer built, on the variables it would have used, PISA dense.
    ref = jax.jit(model.apply)(variables, image, disparity, focus, strength)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert out.shape == (2, 16, 24, 3) and np.all(np.isfinite(out))

    # Deterministic, one compilation for every focus/strength value and focal-stack frame of a shape.
    np.testing.assert_array_equal(render(image, disparity, focus, strength), out)
    other = render(image, disparity, focus[::-1], 12.0)
    assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-4  # PISA sees focus and strength
    f_n, stack = render.focal_stack((image[0] + 1) / 2, disparity[0], 8.0, 5, batch=2)
    assert render.traces == traces + 1
    np.testing.assert_array_equal(f_n, stack_focus(disparity[0], 5))
    assert stack.shape == (5, 16, 24, 3) and stack.min() >= 0 and stack.max() <= 1
    one = render.render((image[0] + 1) / 2, disparity[0], f_n[3], 8.0)  # a batch of 1: a second shape
    np.testing.assert_allclose(one, stack[3], atol=1e-5)
    # A batch of 1 is a new shape unless an earlier test in this process already compiled it.
    assert render.traces <= traces + 2
    again = OneStep.from_checkpoint(root)  # the same model loaded again shares the compiled programs
    np.testing.assert_array_equal(again(image, disparity, focus, strength), out)
    assert again.traces == render.traces  # loading again compiles nothing new

    with pytest.raises(InputError, match="focus shape"):
        render(image, disparity, np.zeros(3), 1.0)
    with pytest.raises(InputError, match="disparity shape"):
        render(image, disparity[:, :8], 0.5, 1.0)


def test_tiled_vae_with_one_pass_unet_equals_the_whole_render(workdir, onestep):
    root, *_ = workdir
    tiled = OneStep.from_checkpoint(root, tiled=True, vae_tile=16)  # 16 px tiles: several per image
    image, disparity = _inputs(1, 1, 36, 44)  # not a multiple of 8: padded, cropped back
    a = onestep(image, disparity, 0.5, 7.0)
    b = tiled(image, disparity, 0.5, 7.0)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    # The micro VAE has no mid-block attention: nothing forces tiling; SDXL's does at 2048 px.
    assert onestep.needs_tiling(4096, 4096) is False and tiled.needs_tiling(8, 8) is True
    sdxl = VAEConfig.sdxl()
    assert not vae_needs_tiling(sdxl, 1024, 1024) and vae_needs_tiling(sdxl, 2048, 2048)


def test_lora_workdir_loads_the_trained_tree_on_the_runs_base(tmp_path):
    root, config, model, variables = write_workdir(tmp_path / "lora", "lora", step=4, seed=9)
    loaded = load_model(root)
    assert loaded.kind == "workdir" and loaded.base == "random" and loaded.source.endswith("/4")
    assert loaded.model.unet.lora == model.unet.lora
    got, want = jax.tree.leaves_with_path(loaded.variables), jax.tree.leaves_with_path(variables)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(path))
    start = load_model(root, initial=True)  # the run before training: a fresh adapter (B = 0)
    lora_b = [x for p, x in jax.tree.leaves_with_path(start.variables["unet"]["lora"]) if p[-1].key == "B"]
    assert lora_b and all(not np.any(np.asarray(b)) for b in lora_b)
    with pytest.raises(InputError, match="no checkpoint of step 7"):
        load_model(root, step=7)
    with pytest.raises(InputError, match="not a training workdir"):
        load_model(tmp_path)


def test_trained_and_export_folders_load_the_same_model(tmp_path):
    from export_helpers import random_trained, write_base

    from bokehdiff_jax.convert.base import load_base
    from bokehdiff_jax.convert.trained import flatten, save_trained
    from bokehdiff_jax.export.bundle import export_model

    base = write_base(tmp_path / "base", "mini")
    trained = random_trained(base, rank=4, alpha=8.0, seed=3)
    save_trained(trained, tmp_path / "ours")
    export_model(trained, tmp_path / "exported")
    a, b = load_model(tmp_path / "ours"), load_model(tmp_path / "exported")
    assert (a.kind, b.kind) == ("trained", "export")
    assert a.model.unet.routing == b.model.unet.routing == trained.spec.routing
    # Every leaf is the trained one (LoRA, VAE parts, prompt) or else the base's.
    base_leaves = flatten(load_base(base).variables)
    trained_leaves = {**flatten(trained.trainable), **flatten({"cond": trained.cond})}
    for got in (a.variables, b.variables):
        flat = flatten(got)
        assert set(flat) == set(trained_leaves) | (
            set(base_leaves) - {"cond/prompt_embeds", "cond/text_embeds"}
        )
        for key, x in flat.items():
            want = trained_leaves.get(key, base_leaves.get(key))
            np.testing.assert_allclose(np.asarray(x), np.asarray(want), rtol=1e-6, err_msg=key)
    with pytest.raises(InputError, match="step applies to a training workdir"):
        load_model(tmp_path / "ours", step=3)


def test_vanilla_attention_in_query_chunks_is_exact(monkeypatch):
    from bokehdiff_jax.models import attention

    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 8)), jnp.float32) for _ in range(3))
    whole = attention.vanilla_attention(q, k, v)
    monkeypatch.setattr(attention, "VANILLA_CHUNK_ELEMENTS", 2 * 3 * 37 * 5)  # 5 queries per chunk
    np.testing.assert_allclose(attention.vanilla_attention(q, k, v), whole, rtol=1e-6, atol=1e-6)
    assert AttentionRouting().pisa.impl == "auto"


def test_evaluate_model_method_renders_with_onestep(workdir, onestep):
    from bokehdiff_jax.evaluate.methods import make_renderer

    root, *_ = workdir
    image, disparity = _inputs(3, 1, 16, 24)
    image01 = (image[0] + 1) / 2
    got = make_renderer(f"trained=model:{root}")(image01, disparity[0], 0.4, 5.0)
    want = onestep.render(image01, disparity[0], 0.4, 5.0)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_evaluate_cli_model_method_from_a_relative_workdir(workdir, onestep, tmp_path, monkeypatch):
    """``evaluate --method model:PATH`` end to end, PATH relative to where the user is (Orbax reads a
    checkpoint's metadata only from an absolute path), and ``@0``: the run's untrained starting point."""
    import json

    from bokehdiff_jax.cli import main
    from bokehdiff_jax.evaluate.sources import HeldoutSynthetic
    from bokehdiff_jax.io.images import read_image, to_uint8
    from bokehdiff_jax.train.build import base_variables

    root, config, model, _ = workdir
    monkeypatch.chdir(root.parent)
    argv = ["evaluate", "--data", "heldout", "--count", "1", "--size", "16", "--metrics", "psnr,ssim",
            "--method", f"model:{root.name}", "--method", f"untrained=model:{root.name}@0",
            "--out", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(s["methods"]) == [f"model_{root.name}", "untrained"] and s["count"] == 1
    ex = HeldoutSynthetic(count=1, size=16)[0]
    got = read_image(tmp_path / "out" / "pred" / f"model_{root.name}" / f"{ex.name}.png")
    want = onestep.render(ex.image, ex.disparity, ex.focus, ex.strength)
    assert np.abs(got - to_uint8(np.asarray(want)) / np.float32(255)).max() <= 1 / 255 + 1e-6
    # @0: the run's initial weights (here the seeded random init the trained tree was perturbed from).
    initial = OneStep(model, base_variables(config, model)).render(
        ex.image, ex.disparity, ex.focus, ex.strength
    )
    untrained = read_image(tmp_path / "out" / "pred" / "untrained" / f"{ex.name}.png")
    assert np.abs(untrained - to_uint8(np.asarray(initial)) / np.float32(255)).max() <= 1 / 255 + 1e-6
    assert np.abs(untrained - got).mean() > 1e-3


def test_model_method_step_suffix():
    from bokehdiff_jax.evaluate.methods import model_path_step, parse_method

    assert model_path_step("runs/a@b/tiny@12") == ("runs/a@b/tiny", 12)
    assert model_path_step("runs/tiny@best") == ("runs/tiny@best", None)
    assert model_path_step("runs/tiny") == ("runs/tiny", None)
    assert parse_method("model:runs/tiny@0").label == "model_tiny_0"
