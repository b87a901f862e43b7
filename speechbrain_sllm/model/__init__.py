"""Speech encoders, adaptors and the SpeechLLM module."""
