"""Sizing: the model's shape (model), a fine-tuning run's memory, duration and cost (training),
one vLLM replica's memory and tensor parallelism (serving). Pure arithmetic; docs/sizing.md."""
