"""Subcommands of ``bokehdiff-jax`` that span several packages, one module per subcommand
(``add_arguments(parser)``, ``run(args)``): ``render`` (the classical renderer and the one-step model,
which sits above it in the layering, so the command lives above both). Nothing imports these modules."""
