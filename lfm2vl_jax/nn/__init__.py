"""The model's math as plain functions over a params pytree and a frozen config: layers, attention (the
one entry point), short convolution, vision tower, projector, text tower, the whole forward pass, and the
params table (`params.param_specs`)."""
