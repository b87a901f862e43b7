"""Data: manifests and audio policy, prompts, tokenizers, speech synthesis, synthetic QA."""
