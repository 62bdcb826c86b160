"""The prompt protocol: conversations, the templates that render them (Vicuna, Llama-2-chat), the image
placeholder and stop strings. Serving speaks it, the clinical layer writes questions in it, training
renders its targets with it, and the vLLM export writes it out as a chat template."""
