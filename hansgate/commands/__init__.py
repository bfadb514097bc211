"""One module per ``hansgate`` subcommand (see ``hansgate.cli``)."""
