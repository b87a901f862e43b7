"""Contributing recipes to SpeechBrain: upstream's consistency rules (``checks``)."""
