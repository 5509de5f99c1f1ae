"""Ahead-of-time compilation of the real train and decode steps for TPU pods and simulated
CPU meshes, from abstract shapes only: per-chip memory, FLOPs, collectives, roofline."""
