"""The named scopes (`jax.named_scope`) around the parts of a training step, one home for their
names: they reach the compiled ops' `op_name` metadata, by which `nsa_jax.train.profile`
splits a traced step into parts."""

VISION = "vision"  # the vision tower (vlm.py)
LANGUAGE = "language"  # the decoder layers (language.py)
ATTENTION = "attention"  # a decoder layer's attention, between its projections (language.py)
LOSS = "loss"  # the LM head and the cross-entropy (train/step.py)
