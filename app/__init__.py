"""The Gradio clinic app (see the clinic-app issue). It imports `model`; `model` never imports it."""
