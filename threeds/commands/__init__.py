"""One module per CLI subcommand; each has `add_parser(subparsers)` and `main(args) -> int`."""

# Order is the order `threeds --help` lists them: the method's order.
COMMANDS = ["sample", "rate", "filter", "generate", "score", "select", "run", "proxy_check", "train", "eval", "experiment"]
