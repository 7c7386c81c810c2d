"""LLM Workbench: prepare → quantize → shard → evaluate → serve + load-test → report."""

__version__ = "0.1.0"
