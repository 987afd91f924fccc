"""The operation's insides, beneath :mod:`sftkey.api`: the inputs, the passes, the per-token
formulas and their autograd, between the public functions and the backends."""
