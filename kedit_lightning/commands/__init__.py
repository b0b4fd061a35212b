"""`kedit export | edit | eval`: one small module per subcommand (see kedit_lightning/cli.py)."""
