"""The Gradio page: layout and wiring (`ui`), plain handlers, and the per-tab consultation state."""
