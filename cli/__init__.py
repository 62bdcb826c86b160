"""The command line: one module per group of commands, each holding its flags beside its code.

`launch.py` is the entry point (`python launch.py` serves the app). Imports stay inside each command:
torch + transformers + gradio take ~12 s to import on two cores, and `inspect` or `--help` should not
pay for what they do not use.
"""
