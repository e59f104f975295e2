"""CLI subcommands, one module per area; qlaunch.cli.app.COMMAND_MODULES lists them."""
