"""Selection: k-center greedy, percentile bands and rules applied as one selection, pick orders, A' flags."""
