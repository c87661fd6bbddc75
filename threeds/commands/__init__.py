"""One module per CLI subcommand; each has `add_parser(subparsers)` and `main(args) -> int`."""

# Order is the order `threeds --help` lists them: the method's order.
COMMANDS = ["rate", "filter", "generate", "score", "select", "run", "train", "eval", "experiment"]
