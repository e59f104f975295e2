"""The command line: parser, output, one module of subcommands per area."""
