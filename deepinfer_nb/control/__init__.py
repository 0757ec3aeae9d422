"""The control plane: scheduler (pure placement), controller loop, worker agent, launcher.
Never imports vllm, ipywidgets or IPython."""
