"""Running on many devices and hosts, and planning memory for it.

`distributed` joins JAX's multi-process runtime, `launch` tries it on one machine, `memory`
estimates a round's device memory and picks a chunk width, `targets` lets it compile for a GPU
this machine does not have, `plan` is its command line. Modules
are imported directly (`from fedjax_lm.scale.distributed import ...`) so the launcher stays light.
"""
