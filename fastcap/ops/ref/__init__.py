"""Pure-PyTorch references of the ops: runtime code (the CPU trains with them), vectorised,
importable without Triton. Each computes exactly the function its op's docstring states."""
