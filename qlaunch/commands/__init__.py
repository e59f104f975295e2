"""CLI subcommands, one module per area; cli.COMMAND_MODULES lists them."""
