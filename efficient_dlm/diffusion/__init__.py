"""Diffusion objectives: corruption (masking), objectives (block diffusion, MDLM, AR), losses."""
