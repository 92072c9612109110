"""Trainer: deterministic, resumable GPT pretraining on torch.distributed. Imports nothing from agent/coordinator."""
