"""Stable Diffusion + LoRA: the synthetic X-rays for the small classes.

- `diffusion`: the SD + LoRA core without Ray or MLflow (targets, loss, diffusers-format save/load);
- `finetune`: the LoRA fine-tune on Ray Train, registered as pneumonia-sd-lora (jobs.finetune_diffusion);
- `generation`: the generate stage on Ray Data actors and its synthetic manifest (jobs.generate);
- `quality`: how close the images are to real ones (FD / KID), label fidelity, the sample grid.
"""
