"""The training wing: state, step, loss scaling, RNG, metrics and memory accounting."""
