"""The clinic app: settings, privacy and the server that mounts the web page and the API on one
FastAPI app. It imports `model`; `model` never imports it."""
