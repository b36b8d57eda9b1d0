"""Training (issue 9): ``bokehdiff-jax train --config configs/NAME.py[:variants] --workdir DIR``.

- ``config``: configs as data (``default_config``, variants, strict ``--config.KEY=VALUE`` overrides).
- ``objective``: the model, its trainable/frozen split and the losses, built from a config.
- ``optim``: AdamW per group (LoRA, U-Net, VAE, discriminator), warm-up + cosine, clipping.
- ``step``: the pure donated step and its ahead-of-time compilation with shardings.
- ``build``: abstract shapes, shardings and initial values of a run; ``data``: the Grain stream.
- ``checkpoint``: orbax; ``logs``: progress bar, metrics.jsonl, TensorBoard; ``dry_run``: compile-only.
- ``loop``: ``train(config, workdir)``; ``cli``: the command (thin).

Only the light modules are imported here; ``loop`` (grain, orbax, tensorboardX) loads on demand.
"""
