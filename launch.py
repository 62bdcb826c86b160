"""SkinGPT: one entry point. `python launch.py` serves the app; `python launch.py --help` lists the
commands, each of which lives, with its flags, in `cli/`."""

from __future__ import annotations

import os
import sys

# Never reach a hub or send analytics at run time, whatever the environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

if __name__ == "__main__":
    from cli.main import main

    sys.exit(main())
