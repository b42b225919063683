"""Sharding over device meshes: the logical-axis rules (`rules`), meshes (`mesh`), and the shardings of
params, cache, batches and activations (`sharding`)."""
