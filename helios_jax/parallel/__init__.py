"""Scale-out with JAX's own sharding: the device mesh, parameter sharding rules, sequence-parallel attention."""
