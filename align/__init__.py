"""align: post-training for LLMs. The core: config, data, models + fine-tuning methods, learners,
Ray actor groups, the SFT / reward-model / RL / preference stages and the CLI.

Kept import-light on purpose: `align.types` is imported by algorithms/, rewards/ and rollout/, so
this file imports nothing else from the project (DESIGN.md, "Who imports whom").
"""
__version__ = "0.1.0"
