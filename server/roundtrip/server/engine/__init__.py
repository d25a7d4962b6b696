"""The engine over the programs: executables and parameters kept per shape, the warm-up
that compiles and proves exactness before SERVING, and the audit of live answers."""
