"""Adapter format (PEFT folder + manifest), validation, offline fine-tuning."""
