"""Photos: `decode` turns uploaded or stored bytes into a clean upright sRGB image (every reader goes
through it: serving, training, fitting, evaluation); `preprocess` turns that into model input."""
