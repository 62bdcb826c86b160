"""Two-step fine-tuning: step 1 aligns images with clinical concepts, step 2 names the disease."""
