"""The JAX programs and what decides their bits: the contract's eager reference steps, the
same steps as traced programs, the primitive fencing that keeps XLA from rewriting across
them, the compiled executables, and the numerics identity a caller can insist on."""
